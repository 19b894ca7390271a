"""Models held in float32 but stored in bfloat16: hashes of what is on disk, exact rounding."""

from __future__ import annotations

import torch

from attribution.fingerprint import tensor_hash, tensor_hashes
from attribution.precision import as_stored, mark_stored, round_to_stored, stored_dtypes


def tied_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    net[1].weight = net[0].weight  # tied, as an LM head shares its embedding
    return net


def test_hashes_of_a_marked_model_equal_those_of_its_stored_tensors():
    net = tied_net()
    stored = {k: v.to(torch.bfloat16) for k, v in net.state_dict().items()}
    net.load_state_dict({k: v.float() for k, v in stored.items()})  # exact upcast
    unmarked = tensor_hashes(net)
    mark_stored(net, dict.fromkeys(stored, torch.bfloat16))
    hashes = tensor_hashes(net)
    assert hashes == {k: tensor_hash(v) for k, v in stored.items()}
    assert hashes != unmarked  # float32 bytes hash differently: the marks are used


def test_rounding_leaves_stored_values_bit_identical_and_rounds_new_ones():
    net = tied_net()
    net.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in net.state_dict().items()})
    mark_stored(net, {"0.weight": torch.bfloat16, "1.weight": torch.bfloat16})
    before = net[0].weight.detach().clone()
    round_to_stored(net)
    assert torch.equal(net[0].weight, before)  # exact: the values came from bfloat16
    with torch.no_grad():
        net[0].weight[0, 0] += 1e-3
    round_to_stored(net)
    value = net[0].weight[0, 0]
    assert torch.equal(value, value.to(torch.bfloat16).float())
    assert net[1].weight is net[0].weight  # the tie survives


def test_as_stored_casts_for_saving_and_back_exactly():
    net = tied_net()
    mark_stored(net, {"0.weight": torch.float16})
    round_to_stored(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with as_stored(net):
        assert net[0].weight.dtype == torch.float16 and net[1].weight.dtype == torch.float16
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.float32 for k in after)


def test_only_narrower_floating_dtypes_are_marked():
    net = torch.nn.Linear(2, 2).double()
    mark_stored(net, {"weight": torch.float32, "bias": torch.float64, "absent": torch.float16})
    assert stored_dtypes(net) == {"weight": torch.float32}
    assert stored_dtypes(torch.nn.Linear(1, 1)) == {}  # an unmarked model
