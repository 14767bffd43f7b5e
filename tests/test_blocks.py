"""Block-by-block execution reproduces the model's own forward."""

import pytest
import torch
from torch import nn

from optimum_lowrank.blocks import capture_block_inputs, find_blocks, run_block, run_blocks
from optimum_lowrank.errors import DataError, PassError
from optimum_lowrank.testing import tiny_bert, tiny_llama


@pytest.mark.parametrize(("factory", "kind", "path"), [(tiny_bert, "encoder", "encoder.layer"), (tiny_llama, "decoder", "model.layers")])
def test_blocks_reproduce_hidden_states(factory, kind, path):
    model = factory()
    ids = torch.randint(0, 1000, (5, 12), generator=torch.Generator().manual_seed(1))
    stack = find_blocks(model)
    assert stack.path == path and len(stack) == 2
    assert stack.names() == [f"{path}.0", f"{path}.1"]
    inputs = capture_block_inputs(model, stack, ids, kind=kind, batch_size=2)
    assert [item.hidden_states.shape[0] for item in inputs] == [2, 2, 1]
    with torch.no_grad():
        extra = {"use_cache": False} if kind == "decoder" else {"attention_mask": torch.ones_like(ids)}
        reference = model(input_ids=ids, output_hidden_states=True, **extra).hidden_states
    # hidden_states[k] is the input of block k; Llama's last entry has the final norm applied, so stop before it
    last = len(stack) if kind == "encoder" else len(stack) - 1
    for k in range(last + 1):
        got = torch.cat([item.hidden_states for item in run_blocks(stack, inputs, stop=k)])
        torch.testing.assert_close(got, reference[k], rtol=0, atol=1e-5)


def test_run_block_keeps_keyword_arguments():
    model = tiny_llama()
    stack = find_blocks(model)
    inputs = capture_block_inputs(model, stack, torch.zeros(2, 6, dtype=torch.long), kind="decoder")
    assert "position_embeddings" in inputs[0].kwargs
    after = run_block(stack.blocks[0], inputs)
    assert after[0].kwargs is inputs[0].kwargs
    assert not torch.equal(after[0].hidden_states, inputs[0].hidden_states)


def test_find_blocks_names_the_model_class():
    with pytest.raises(PassError, match=r"cannot run Sequential block by block: .*model\.layers"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_capture_rejects_malformed_ids():
    model = tiny_bert()
    with pytest.raises(DataError, match="num_samples, seq_len"):
        capture_block_inputs(model, find_blocks(model), torch.zeros(3, dtype=torch.long), kind="encoder")
