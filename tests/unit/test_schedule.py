"""Micro-batches reach the model's device (issue 13, defect 1).

A batch built on the host used to be handed to the model as is: on a GPU, the
embedding lookup got CPU indices against CUDA weights. Without a GPU here the model
lives on the ``meta`` device, a real second device that torch moves tensors to.
"""

from __future__ import annotations

import torch

from megatron_alp.schedule import _forward_step


class _Recorder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(4, 8, device="meta"))
        self.seen: dict[str, torch.device | None] = {}

    def forward(self, tokens, position_ids, attention_mask=None):
        self.seen = {"tokens": tokens.device, "position_ids": position_ids.device}
        return self.weight[tokens]  # the embedding-lookup shape of the failure


def test_forward_step_moves_the_batch_to_the_models_device():
    model = _Recorder()
    batch = {
        "tokens": torch.tensor([[1, 2, 3]]),
        "position_ids": torch.arange(3)[None],
        "labels": torch.tensor([[2, 3, 0]]),
        "sample_offset": torch.tensor(4),
        "name": "not a tensor",
    }
    seen_by_loss = {}

    def loss_fn(logits, b):
        seen_by_loss.update({k: v.device for k, v in b.items() if isinstance(v, torch.Tensor)})
        return logits.sum(), {}

    logits, loss_func = _forward_step(loss_fn, None, iter([batch]), model)
    assert model.seen == {"tokens": torch.device("meta"), "position_ids": torch.device("meta")}
    assert logits.device == torch.device("meta")
    loss_func(logits)
    assert seen_by_loss["labels"] == torch.device("meta")
    # 0-dim scalars are host metadata (read with .item()): no GPU round trip
    assert seen_by_loss["sample_offset"] == torch.device("cpu")
    assert batch["tokens"].device == torch.device("cpu")  # the caller's batch is untouched


def test_batch_to_device_keeps_non_tensors_and_scalars():
    from megatron_alp.schedule import batch_to_device

    b = batch_to_device({"x": torch.ones(2), "s": torch.tensor(1), "n": 3}, torch.device("meta"))
    assert b["x"].device.type == "meta" and b["s"].device.type == "cpu" and b["n"] == 3
