"""The handoff's header read on its own, without a process group: what a sender writes parses back to its
fields' dtypes and shapes; an all-zero header (what a receive buffer holds after nccl's watchdog aborted
the transfer) or another version is refused, naming the sending rank."""

from __future__ import annotations

import pytest
import torch

from wan_dist.parallel.handoff import _HEADER_LEN, HEADER_VERSION, DitInputs, DitOutputs, _header, parse_header

CPU = torch.device("cpu")


def test_a_header_parses_back_to_its_fields():
    message = DitInputs(prompt_embeds=torch.zeros(1, 7, 3), image_embeds=torch.zeros(2, 5, dtype=torch.bfloat16))
    specs = parse_header(_header(message, CPU).tolist(), DitInputs, src=0)
    assert specs == {"prompt_embeds": (torch.float32, [1, 7, 3]), "negative_prompt_embeds": None,
                     "image_embeds": (torch.bfloat16, [2, 5]), "condition": None}


def test_a_zeroed_header_is_an_aborted_transfer():
    with pytest.raises(RuntimeError, match=r"^transfer from rank 3 aborted: "):
        parse_header([0] * _HEADER_LEN, DitInputs, src=3)


def test_another_version_is_refused():
    values = _header(DitOutputs(torch.zeros(2)), CPU).tolist()
    values[1] = HEADER_VERSION + 1
    with pytest.raises(RuntimeError, match=rf"rank 1 sent handoff format version {HEADER_VERSION + 1}, "
                                           rf"this rank reads version {HEADER_VERSION}"):
        parse_header(values, DitOutputs, src=1)


def test_another_kind_is_refused():
    values = _header(DitOutputs(torch.zeros(2)), CPU).tolist()
    with pytest.raises(RuntimeError, match="rank 2 sent a DitOutputs, expected a DitInputs"):
        parse_header(values, DitInputs, src=2)
