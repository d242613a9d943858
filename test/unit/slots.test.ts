import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { Slots, SlotsBusy } from '../../src/matrix/slots.js';

describe('counted slots', () => {
  test('no more than the limit of holders at once; a release lets the next waiter in, in order of arrival', async () => {
    const slots = new Slots();
    const limits = [{ key: 'a', limit: 2 }];
    const first = await slots.acquire(limits, 1000);
    const second = await slots.acquire(limits, 1000);
    assert.equal(slots.holding('a'), 2);
    const order: string[] = [];
    const third = slots.acquire(limits, 60_000).then((r) => (order.push('third'), r));
    const fourth = slots.acquire(limits, 60_000).then((r) => (order.push('fourth'), r));
    assert.equal(typeof slots.tryAcquire(limits), 'object', 'a newcomer does not get a slot while it is full');
    first();
    first(); // a second release of the same slot changes nothing
    (await third)();
    second();
    (await fourth)();
    assert.deepEqual(order, ['third', 'fourth']);
    assert.equal(slots.holding('a'), 0);
  });

  test('a waiter blocked on one key does not hold up waiters for other keys', async () => {
    const slots = new Slots();
    const total = { key: 'total', limit: 3 };
    const hostA = { key: 'host:a', limit: 1 };
    const heldA = await slots.acquire([total, hostA], 0);
    const waitingForA = slots.acquire([total, hostA], 60_000);
    const b = slots.tryAcquire([total, { key: 'host:b', limit: 1 }]);
    assert.equal(typeof b, 'function', 'host b gets the free slot at once');
    heldA();
    (await waitingForA)();
    (b as () => void)();
    assert.equal(slots.holding('total'), 0);
  });

  test('an acquisition gives up with SlotsBusy naming the full limit: at once when its queue is full, or when its time is up', async () => {
    const slots = new Slots();
    const limit = { key: 'ip:1', limit: 1, queue: 1 };
    const held = await slots.acquire([limit], 0);
    await assert.rejects(slots.acquire([limit], 0), (e: unknown) => e instanceof SlotsBusy && e.limit.key === 'ip:1');
    const waiting = slots.acquire([limit], 5);
    await assert.rejects(slots.acquire([limit], 60_000), SlotsBusy, 'the queue of one is taken');
    await assert.rejects(waiting, SlotsBusy);
    held();
    (await slots.acquire([limit], 0))();
  });
});
