"""Host batches onto the devices: global arrays from per-process rows, read ahead."""

import collections
import json

import jax
import numpy as np

# Batches put on the device ahead of the step that uses them.
DEVICE_PREFETCH = 2


def to_global(local_batch, batch_sharding):
    """This process's rows of a batch -> one global array per key."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}


class DeviceBatches:
    """Training batches put on the device `size` steps ahead; checkpointable.

    Orbax saves it through grain's checkpoint handler (`get_state`/`set_state`/
    `start_prefetch`), with the data position of the last batch handed out, so
    a resumed run starts at the next batch although more have been read.
    """

    def __init__(self, host_iter, sharding, size=DEVICE_PREFETCH):
        self.host_iter, self.sharding, self.size = host_iter, sharding, size
        self.queue = collections.deque()
        self.position = host_iter.get_state()

    def __iter__(self):
        return self

    def __next__(self):
        while len(self.queue) <= self.size:
            batch = to_global(next(self.host_iter), self.sharding)
            self.queue.append((batch, self.host_iter.get_state()))
        batch, self.position = self.queue.popleft()
        return batch

    def skip(self, count):
        """Moves the data position `count` host batches on (before the first batch is read)."""
        for _ in range(count):
            next(self.host_iter)
        self.position = self.host_iter.get_state()

    def get_state(self) -> bytes:
        return json.dumps(self.position).encode()

    def set_state(self, saved: bytes):
        self.position = json.loads(saved)
        self.host_iter.set_state(self.position)
        self.queue.clear()

    def start_prefetch(self):
        pass  # batches are read on the first next()
