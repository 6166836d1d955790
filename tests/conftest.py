"""Shared test settings: one torch thread (small tensors; no oversubscription on 2-core CI machines)."""

import torch

torch.set_num_threads(1)
