"""token_downsampling on tiny random BERTs: a fully kept mask is the original model,
the exported graph (tokens really removed) matches PyTorch in ONNX Runtime, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optimum_lowrank.api import PassContext
from optimum_lowrank.errors import PassError
from optimum_lowrank.exporters.onnx import export_onnx
from optimum_lowrank.layers.token_dropping import TokenDroppingEncoder, TokenKeepPredictor
from optimum_lowrank.passes.pruning.objective import NonFiniteLossError, TaskObjective
from optimum_lowrank.passes.tokens.downsampling import TokenDownsamplingPass
from optimum_lowrank.testing import tiny_context, tiny_llama
from tests.helpers import padded_batch, sentiment_tsv, tiny_classifier, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _padded():
    return padded_batch(5, 64, 14, (14, 9, 4), seed=1)


def _install(model, restore=False, inner=None, only=None):
    """Predictors (hidden width ``inner``, see TokenKeepPredictor) before every layer, or before the layers in ``only``."""
    layers = model.bert.encoder.layer
    predictors = [TokenKeepPredictor(64, inner=inner) if only is None or i in only else torch.nn.Identity() for i in range(len(layers))]
    encoder = TokenDroppingEncoder(layers, torch.nn.ModuleList(predictors), restore_positions=restore)
    model.bert.encoder = encoder
    model.eval()
    return encoder


def _dropping(encoder, seed=0):
    """Random predictor outputs: roughly half the tokens dropped at each layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.predictors:
            if not isinstance(p, TokenKeepPredictor):
                continue
            p.net[-1].bias.zero_()
            p.net[-1].weight.copy_(torch.randn(p.net[-1].weight.shape, generator=g))


def _train_without_dropout(model):
    """Train mode (the straight-through token path) with every dropout off, so it can be compared with eval."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_prob"):  # sdpa attention applies its own dropout
            m.dropout_prob = 0.0


@pytest.mark.parametrize("restore", [False, True])
def test_fully_kept_mask_equals_the_original(restore):
    model = tiny_classifier()
    ids, mask = _padded()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    encoder = _install(model, restore)  # predictors start at keep +5 / drop -5: everything kept
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-6, rtol=0)
    assert encoder.stats["kept_tokens"] == [float(mask.sum())] * 2
    if restore:  # full length, dropped (here: none) and kept tokens at their positions
        with torch.no_grad():
            hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        valid = mask.bool()  # padding positions keep their embedding (never processed), which pooling ignores
        torch.testing.assert_close(hidden[valid], reference.hidden_states[-1][valid], atol=1e-5, rtol=0)


def test_dropped_tokens_are_removed_and_rows_of_a_batch_are_exact():
    model = tiny_classifier()
    encoder = _install(model)
    _dropping(encoder)
    ids, mask = _padded()
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
        kept = encoder.stats["kept_tokens"]
        rows = [model(input_ids=ids[i : i + 1, : int(mask[i].sum())]).logits[0] for i in range(3)]
    assert kept[0] < float(mask.sum()) and kept[1] <= kept[0]  # tokens dropped, and dropped stays dropped
    torch.testing.assert_close(torch.stack(rows), batch, atol=1e-5, rtol=0)


@pytest.mark.parametrize("inner", [None, 8, 0])
def test_train_mode_with_hard_decisions_matches_eval_removal(inner):
    """The straight-through training path (masking) and the inference path (removal) agree."""
    model = tiny_classifier()
    encoder = _install(model, inner=inner)
    with torch.no_grad():
        for p in encoder.predictors:
            p.net[-1].bias.copy_(torch.tensor([-1e4, 1e4]))  # decisions certain: Gumbel noise cannot flip them
        encoder.predictors[1].net[-1].bias.copy_(torch.tensor([1e4, -1e4]))  # layer 1 drops everything but [CLS]
    ids, mask = _padded()
    with torch.no_grad():
        evaluated = model(input_ids=ids, attention_mask=mask).logits
        _train_without_dropout(model)
        trained = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(trained, evaluated, atol=1e-5, rtol=0)


def test_hard_decisions_train_on_exactly_what_inference_drops():
    """``hard_decisions``: uncertain predictors (Gumbel samples would flip decisions), yet the
    training forward equals the inference graph's output."""
    model = tiny_classifier()
    encoder = _install(model)
    _dropping(encoder)
    ids, mask = _padded()
    with torch.no_grad():
        evaluated = model(input_ids=ids, attention_mask=mask).logits
        _train_without_dropout(model)
        torch.manual_seed(0)
        model(input_ids=ids, attention_mask=mask)
        sampled = [k.clone() for k in encoder.stats["keep"]]
        encoder.hard_decisions = True
        trained = model(input_ids=ids, attention_mask=mask).logits
    assert any(not torch.equal(a, b) for a, b in zip(sampled, encoder.stats["keep"]))  # Gumbel samples differ from inference
    torch.testing.assert_close(trained, evaluated, atol=1e-5, rtol=0)


def test_finetune_steps_adapt_the_weights_and_leave_the_predictors(tmp_path):
    """``finetune_steps`` runs after training: same predictors as without it, other weights moved."""
    data = sentiment_tsv(tmp_path / "train.tsv", rows=32)
    tokenizer = word_tokenizer(tmp_path)
    options = {"targets": ["bert.encoder"], "data": str(data), "steps": 10, "batch_size": 8, "layers": [1],
               "predictor_hidden": 8, "predictor_init_bias": 0.5, "target_keep": 0.5, "predictor_lr": 0.02}
    models = {}
    for steps in (0, 6):
        models[steps] = tiny_classifier()
        TokenDownsamplingPass({**options, "finetune_steps": steps}).run(models[steps], PassContext(tokenizer=tokenizer))
    plain, tuned = (dict(models[s].named_parameters()) for s in (0, 6))
    predictors = [k for k in plain if ".predictors." in k]
    assert predictors and all(torch.equal(plain[k], tuned[k]) for k in predictors)
    assert any(not torch.equal(plain[k], tuned[k]) for k in plain if ".predictors." not in k)
    assert not models[6].bert.encoder.hard_decisions  # switched off again
    with pytest.raises(ValueError, match="finetune_steps"):
        TokenDownsamplingPass({"targets": ["bert.encoder"], "finetune_steps": -1})


@pytest.mark.parametrize(("inner", "only"), [(None, None), (0, (0,)), (8, (1,))])
def test_exported_graph_matches_pytorch_in_onnx_runtime_batch_1_and_padded(tmp_path, inner, only):
    """Also with the cheap predictors (a D -> 8 -> 2 MLP, a linear D -> 2) before one chosen layer only."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = tiny_classifier()
    encoder = _install(model, inner=inner, only=only)
    _dropping(encoder)
    path = export_onnx(model, tmp_path / "onnx", "text-classification")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"TopK", "GatherElements", "Range"} <= ops  # the sequence really shrinks inside the graph
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, mask = _padded()
    for rows in ([1], [0, 1, 2]):
        feeds = {"input_ids": ids[rows].numpy(), "attention_mask": mask[rows].numpy(), "token_type_ids": np.zeros_like(ids[rows].numpy())}
        got = session.run(["logits"], feeds)[0]
        with torch.no_grad():
            want = model(input_ids=ids[rows], attention_mask=mask[rows]).logits.numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    quantized = tmp_path / "model_quantized.onnx"
    quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    q = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
    got = q.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": np.zeros_like(ids.numpy())})[0]
    assert np.isfinite(got).all() and np.abs(got - model(input_ids=ids, attention_mask=mask).logits.detach().numpy()).max() < 0.5


def test_pass_trains_on_labelled_data_and_drops_tokens(tmp_path):
    model = tiny_classifier()
    data = sentiment_tsv(tmp_path / "train.tsv", rows=32)
    context = PassContext(tokenizer=word_tokenizer(tmp_path))
    reports = TokenDownsamplingPass({"targets": ["bert.encoder"], "data": str(data), "steps": 25, "batch_size": 8,
                                     "target_keep": 0.3, "predictor_lr": 0.05}).run(model, context)
    assert isinstance(model.bert.encoder, TokenDroppingEncoder) and not model.bert.encoder.restore_positions
    assert reports[0].params_after > reports[0].params_before
    assert reports[0].metrics["kept_fraction_train"] < 0.9


def test_cheap_predictors_before_chosen_layers_only(tmp_path):
    """``layers`` + ``predictor_hidden`` (0: a linear D -> 2; n: D -> n -> 2) + ``predictor_init_bias``."""
    assert TokenKeepPredictor(64).macs_per_token() == 64 * 64 + 64 * 2
    assert TokenKeepPredictor(64, inner=16).macs_per_token() == 64 * 16 + 16 * 2
    assert TokenKeepPredictor(64, inner=0).macs_per_token() == 64 * 2
    model = tiny_classifier()
    ids, mask = _padded()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
    encoder = _install(model, inner=0, only=(0,))  # starts fully kept: the original model
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, reference, atol=1e-6, rtol=0)
    assert len(encoder.stats["kept_tokens"]) == 1
    model = tiny_classifier()
    data = sentiment_tsv(tmp_path / "train.tsv", rows=32)
    context = PassContext(tokenizer=word_tokenizer(tmp_path))
    reports = TokenDownsamplingPass({"targets": ["bert.encoder"], "data": str(data), "steps": 25, "batch_size": 8, "layers": [0],
                                     "predictor_hidden": 0, "predictor_init_bias": 1.0, "target_keep": 0.3,
                                     "predictor_lr": 0.05}).run(model, context)
    first, second = model.bert.encoder.predictors
    assert isinstance(first, TokenKeepPredictor) and first.inner == 0 and isinstance(second, torch.nn.Identity)
    assert reports[0].params_after - reports[0].params_before == 2 * 64 + 64 * 2 + 2  # LayerNorm + Linear(64, 2)
    assert reports[0].metrics["kept_fraction_train"] < 0.9
    with pytest.raises(ValueError, match="predictor_hidden"):
        TokenDownsamplingPass({"targets": ["bert.encoder"], "predictor_hidden": -1})


def test_calibrate_keep_matches_the_inference_kept_fraction_to_training(tmp_path):
    """``calibrate_keep``: eval-mode (argmax) decisions keep ``target_keep`` of the tokens."""
    from optimum_lowrank.tasks import encode_batches, load_labelled_tsv

    model = tiny_classifier()
    data = sentiment_tsv(tmp_path / "train.tsv", rows=32)
    tokenizer = word_tokenizer(tmp_path)
    reports = TokenDownsamplingPass({"targets": ["bert.encoder"], "data": str(data), "steps": 20, "batch_size": 8, "layers": [1],
                                     "predictor_hidden": 8, "predictor_init_bias": 0.5, "target_keep": 0.6, "predictor_lr": 0.02,
                                     "calibrate_keep": True}).run(model, PassContext(tokenizer=tokenizer))
    assert "keep-bias shifts" in reports[0].note
    wanted = 0.6  # target_keep (the sampled training fraction oscillates under the Lagrangian)
    kept = valid = 0.0
    with torch.no_grad():
        for inputs, _, _ in encode_batches(tokenizer, load_labelled_tsv(str(data)), 8, 64):
            model(**inputs)
            kept += model.bert.encoder.stats["kept_tokens"][0]
            valid += model.bert.encoder.stats["valid_tokens"]
    assert wanted < 0.9 and kept / valid == pytest.approx(wanted, abs=0.05), (wanted, kept / valid)


def test_decoder_is_a_clear_error_and_a_nan_loss_leaves_the_model(monkeypatch):
    with pytest.raises(PassError, match="encoders only; LlamaForCausalLM is a decoder"):
        TokenDownsamplingPass({"targets": ["model"]}).run(tiny_llama(), tiny_context(kind="decoder"))
    model = tiny_classifier()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(TaskObjective, "loss", lambda self, *a, **k: torch.tensor(float("inf"), requires_grad=True))
    with pytest.raises(NonFiniteLossError, match="became inf"):
        TokenDownsamplingPass({"targets": ["bert.encoder"], "steps": 2, "batch_size": 2}).run(model, tiny_context(vocab_size=64))
    assert type(model.bert.encoder).__name__ == "BertEncoder"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(PassError, match="layers \\[7\\] out of range"):
        TokenDownsamplingPass({"targets": ["bert.encoder"], "layers": [7], "steps": 1}).run(tiny_classifier(), tiny_context(vocab_size=64))
