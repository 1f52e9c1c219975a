"""Issue 20 item 3: the dataset lives on the device for the whole of `fit`; shuffling and
batching happen there, so each chunk of steps receives the same device arrays and only a
scalar position from the host."""

from __future__ import annotations

import jax
import numpy as np
import optax

import fbalign as fb
import fbalign._src.train as T
from fbalign.data import load_dataset
from fbalign.train import fit


def test_every_chunk_gets_the_same_device_resident_training_set(monkeypatch):
    seen = []
    runner_at = T._Program.runner_at

    def recording(self, done):
        size, run = runner_at(self, done)

        def spy(state, x, y, perm, position):
            seen.append((x, y, perm, position))
            return run(state, x, y, perm, position)

        return size, spy

    monkeypatch.setattr(T._Program, "runner_at", recording)
    data = load_dataset("digits")
    fit(fb.mlp((64, 16, 10)), "fa", optax.sgd(0.1), data, epochs=3, batch_size=64,
        progress=False, log_every=5)
    assert len(seen) >= 3 * 4  # several chunks per epoch
    x0, y0 = seen[0][0], seen[0][1]
    assert isinstance(x0, jax.Array) and isinstance(y0, jax.Array)  # on the device already
    assert x0.shape == data.x_train.shape
    assert all(x is x0 and y is y0 for x, y, _, _ in seen)  # uploaded once, never again
    for _, _, perm, position in seen:  # the shuffle is made on the device; the host sends
        assert isinstance(perm, jax.Array) and np.ndim(position) == 0  # one scalar a chunk
