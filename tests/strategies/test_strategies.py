"""The strategy registry: SD 1.5 counts, peft parity and format, exports, zero-init, errors.
(The optimizer over each strategy: test_optim_strategies.py.)

The model is tests.helpers.TinyTextUNet (the `tiny` fixture): a text encoder + UNet small
enough to compile in a few seconds, with every kind of layer the strategies touch.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jaxmed import counts, strategies
from jaxmed.cli import load_config
from jaxmed.models import weights
from jaxmed.models.layers import Linear
from jaxmed.strategies.base import StrategyError, flatten, module_of
from jaxmed.strategies.peft import PeftFormatError
from tests.helpers import TARGETS, leaves_of, optim_config

TOL = 1e-4


@pytest.fixture(scope="module")
def base(tiny):
    """Output of the base model (the 'unet' strategy at init) and the text context."""
    s = strategies.get("unet")
    tr, fr = s.init(tiny.params, jax.random.PRNGKey(0))
    out, ctx, _ = tiny.run("unet", s, tr, fr)
    return out, ctx


# ---------------------------------------------------------------------------------------
# SD 1.5 counts (docs/STUDY.md "Parameter counts of SD 1.5"), abstract shapes only

SD15_COUNTS = {  # strategy (options) -> trainable per component
    ("unet", ()): {"unet": 859_520_964},
    ("vae", ()): {"vae": 83_653_863},
    ("text", ()): {"text_encoder": 123_060_480},
    ("unet+text", ()): {"unet": 859_520_964, "text_encoder": 123_060_480},
    ("unet+vae", ()): {"unet": 859_520_964, "vae": 83_653_863},
    ("vae+text", ()): {"vae": 83_653_863, "text_encoder": 123_060_480},
    ("unet+vae+text", ()): {"unet": 859_520_964, "vae": 83_653_863,
                            "text_encoder": 123_060_480},
    ("lora", ()): {"unet": 1_594_368},
    ("lora", (("rank", 4),)): {"unet": 797_184},
    ("dora", ()): {"unet": 1_694_208},
    ("bitfit", ()): {"unet": 343_684},
    ("difffit", ()): {"unet": 859_077_120},
}


@pytest.fixture(scope="module")
def sd15():
    return counts.abstract_params(counts.arch_configs("sd15"))


@pytest.mark.parametrize("name,opts", list(SD15_COUNTS), ids=lambda v: str(v) if v else "")
def test_seed_counts(sd15, name, opts):
    want = SD15_COUNTS[(name, opts)]
    rep = counts.count_table(strategies.get(name, **dict(opts)), sd15, optim_config())
    got = {c: r["trainable"] for c, r in rep["components"].items() if r["trainable"]}
    assert got == want
    assert rep["total"]["total"] == 1_066_235_307
    assert rep["total"]["trainable"] == sum(want.values())
    # AdamW: two float32 moments per trainable parameter + an int32 step count per group.
    groups = len(want)
    assert rep["total"]["optimizer_state_bytes"] == 8 * sum(want.values()) + 4 * groups
    for r in rep["components"].values():
        assert r["optimizer_state_bytes"] == (8 * r["trainable"] + 4 if r["trainable"] else 0)


def test_seed_counts_extras(sd15):
    rep = {n: counts.count_table(strategies.get(n), sd15)["components"]["unet"]
           for n in ("difffit-orig", "svdiff", "attn")}
    print({n: r["trainable"] for n, r in rep.items()})
    unet_total = 859_520_964
    assert 0 < rep["svdiff"]["trainable"] < 0.01 * unet_total
    assert 343_684 < rep["difffit-orig"]["trainable"] < 0.001 * unet_total
    attn = sum(int(np.prod(v.shape)) for p, v in flatten(sd15["unet"]).items()
               if module_of(p).split(".")[-1] in ("to_q", "to_k", "to_v")
               or module_of(p).endswith("to_out.0"))
    assert rep["attn"]["trainable"] == attn


# ---------------------------------------------------------------------------------------
# Zero-initialised adapters: bit for bit the base model


@pytest.mark.parametrize("name", ["lora", "dora", "difffit", "svdiff", "difffit-orig"])
def test_zero_init_is_bitwise_base(tiny, base, name):
    s = strategies.get(name)
    tr, fr = s.init(tiny.params, jax.random.PRNGKey(1))
    out, ctx, _ = tiny.run(name, s, tr, fr)
    assert np.array_equal(out, base[0]), np.abs(out - base[0]).max()
    exported = s.export(tr, fr)
    for k, v in leaves_of(tiny.params).items():
        assert np.array_equal(leaves_of(exported)[k], v), k


# ---------------------------------------------------------------------------------------
# peft parity: same adapter weights, same outputs and gradients


@pytest.fixture(scope="module", params=["lora", "dora"])
def peft_case(request, tiny, base, tmp_path_factory):
    """peft-wrapped diffusers UNet with random adapters, saved by peft; the same adapters
    read by jaxmed's load_peft; outputs and gradients of both."""
    from peft import LoraConfig, get_peft_model

    torch = tiny.torch
    kind = request.param
    use_dora = kind == "dora"
    tmp = tmp_path_factory.mktemp(f"peft-{kind}")
    model = get_peft_model(tiny.torch_unet(), LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_dora=use_dora))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(tmp / "from-peft"))
    ctx = base[1]
    out_t = tiny.torch_forward(model, ctx, grad=True)
    grads_t = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.requires_grad}

    s = strategies.get(kind, rank=4, alpha=8.0)
    trainable = s.load_peft(str(tmp / "from-peft"), tiny.params)
    _, frozen = s.init(tiny.params, jax.random.PRNGKey(0))
    out_j, _, grads_j = tiny.run(kind, s, trainable, frozen)
    return dict(kind=kind, s=s, tmp=tmp, trainable=trainable, frozen=frozen, out_t=out_t,
                out_j=out_j, grads_t=grads_t, grads_j=grads_j, ctx=ctx)


def _torch_name(path: tuple) -> str:
    """jaxmed trainable path -> the peft-wrapped model's parameter name."""
    comp, *rest = path
    leaf = rest.index("lora_A") if "lora_A" in rest else (
        rest.index("lora_B") if "lora_B" in rest else rest.index("lora_magnitude_vector"))
    module = module_of(tuple(rest[:leaf]) + ("kernel",))
    return f"base_model.model.{module}.{rest[leaf]}.default.weight"


def test_peft_parity_outputs(peft_case):
    c = peft_case
    err = np.abs(c["out_j"] - c["out_t"]).max()
    print(f"{c['kind']}: max |out_jaxmed - out_peft| = {err:.2e}")
    assert err <= TOL
    assert np.abs(c["out_t"]).max() > 1e-2


def test_peft_parity_gradients(peft_case):
    c = peft_case
    flat = leaves_of(c["grads_j"])
    assert len(flat) == len(c["grads_t"]) == (3 if c["kind"] == "dora" else 2) * 24
    worst = 0.0
    for path, gj in flat.items():
        gt = c["grads_t"][_torch_name(path)]
        gt = gt.T if gt.ndim == 2 else gt
        assert gj.shape == gt.shape, path
        scale = np.abs(gt).max()
        assert scale > 0, path
        worst = max(worst, np.abs(gj - gt).max() / scale)
    print(f"{c['kind']}: max relative gradient error (per tensor) = {worst:.2e}")
    assert worst <= TOL


def test_peft_round_trip(peft_case, tiny):
    """jaxmed's save_peft: exactly peft's keys and shapes; peft loads it (both ways) and
    reproduces jaxmed's output; load_peft reads back the same tree."""
    from peft import (
        LoraConfig,
        PeftModel,
        inject_adapter_in_model,
        set_peft_model_state_dict,
    )
    from safetensors.torch import load_file

    c = peft_case
    out = str(c["tmp"] / "from-jaxmed")
    assert c["s"].save_peft(c["trainable"], out, base_model="/models/sd") == [out]
    ours = load_file(os.path.join(out, "adapter_model.safetensors"))
    theirs = load_file(str(c["tmp"] / "from-peft" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype
               for k in ours)
    assert all(np.array_equal(ours[k].numpy(), theirs[k].numpy()) for k in ours)
    with open(os.path.join(out, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["use_dora"], cfg["bias"]) == (
        "LORA", 4, 8.0, c["kind"] == "dora", "none")
    assert cfg["target_modules"] == TARGETS and cfg["base_model_name_or_path"] == "/models/sd"

    model = PeftModel.from_pretrained(tiny.torch_unet(), out)
    err = np.abs(tiny.torch_forward(model, c["ctx"]) - c["out_j"]).max()
    assert err <= TOL, err

    injected = inject_adapter_in_model(LoraConfig.from_pretrained(out), tiny.torch_unet())
    res = set_peft_model_state_dict(injected, ours)
    assert not res.unexpected_keys
    assert not [k for k in res.missing_keys if "lora" in k]
    err = np.abs(tiny.torch_forward(injected, c["ctx"]) - c["out_j"]).max()
    assert err <= TOL, err

    back = c["s"].load_peft(out, tiny.params)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(c["trainable"])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(back),
                                                    jax.tree_util.tree_leaves(c["trainable"])))
    init_tr, _ = c["s"].init(tiny.params, jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(init_tr) == jax.tree_util.tree_structure(back)


def test_peft_text_encoder_adapter(tiny, tmp_path):
    """LoRA on the text encoder too: a second peft folder (text_encoder/) that peft loads onto
    transformers' CLIPTextModel and that reproduces jaxmed's text features."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch = tiny.torch
    s = strategies.get("lora", rank=4, alpha=8.0, text_targets=("q_proj", "v_proj"))
    tr, fr = s.init(tiny.params, jax.random.PRNGKey(0))
    rng = np.random.default_rng(3)
    tr = jax.tree_util.tree_map(lambda v: 0.3 * rng.standard_normal(v.shape, np.float32), tr)
    assert s.lr_labels(tr)["text_encoder"] and s.learning_rates()["text_encoder"] == 1e-4
    written = s.save_peft(tr, str(tmp_path))
    assert written == [str(tmp_path), str(tmp_path / "text_encoder")]

    ref = get_peft_model(tiny.torch_text(), LoraConfig(r=4, lora_alpha=8,
                                                       target_modules=["q_proj", "v_proj"]))
    ref.save_pretrained(str(tmp_path / "ref"))
    ours = safetensors.numpy.load_file(str(tmp_path / "text_encoder" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(safetensors.numpy.load_file(
        str(tmp_path / "ref" / "adapter_model.safetensors")))

    model = PeftModel.from_pretrained(tiny.torch_text(), str(tmp_path / "text_encoder")).eval()
    with torch.no_grad():
        want = model(torch.from_numpy(tiny.ids).long()).last_hidden_state.numpy()

    @jax.jit
    def text(tr, fr, ids):
        with s.intercept("text_encoder", tr, fr):
            return tiny.text.apply({"params": fr["text_encoder"]}, ids).last_hidden_state

    got = np.asarray(text(tr, fr, tiny.ids))
    assert np.abs(got - want).max() <= TOL
    base = np.asarray(text({}, fr, tiny.ids))
    assert np.abs(base - want).max() > 1e-3  # the adapters do act

    back = s.load_peft(str(tmp_path), tiny.params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(back),
                                                    jax.tree_util.tree_leaves(tr)))


@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_branch_matches_peft_formula(use_dora):
    """With dropout in training, the branch sees dropout(x) as in peft's forward: LoRA adds
    s * (x' A) B; DoRA adds (m/n - 1) * x' W + (m/n) * s * (x' A) B (x' = dropout(x))."""
    class Toy(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Linear(6, name="to_q")(x)

    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 4)), jnp.float32)
    params = {"unet": nn.meta.unbox(Toy().init(jax.random.PRNGKey(0), x)["params"])}
    s = strategies.get("dora" if use_dora else "lora", rank=2, alpha=3.0, dropout=0.5,
                       targets=("to_q",))
    tr, fr = s.init(params, jax.random.PRNGKey(1))
    tr = jax.tree_util.tree_map(lambda v: v + 0.3, tr)
    rng = jax.random.PRNGKey(7)

    def run(train):
        with s.intercept("unet", tr, fr, rng=rng, train=train):
            return np.asarray(Toy().apply({"params": fr["unet"]}, x))

    w, b = np.asarray(params["unet"]["to_q"]["kernel"]), np.asarray(params["unet"]["to_q"]["bias"])
    a, bb = (np.asarray(tr["unet"]["to_q"][k]["kernel"]) for k in ("lora_A", "lora_B"))
    keep = np.asarray(jax.random.bernoulli(
        jax.random.fold_in(jax.random.fold_in(rng, 0), 0), 0.5, x.shape))
    xd = np.where(keep, np.asarray(x) / 0.5, 0.0)
    sc = 1.5
    base = np.asarray(x) @ w + b
    if use_dora:
        m = np.asarray(tr["unet"]["to_q"]["lora_magnitude_vector"])
        r = m / np.linalg.norm(w + sc * a @ bb, axis=0)
        want = base + (r - 1) * (xd @ w) + r * sc * (xd @ a @ bb)
        want_eval = base + (r - 1) * (np.asarray(x) @ w) + r * sc * (np.asarray(x) @ a @ bb)
    else:
        want = base + sc * (xd @ a @ bb)
        want_eval = base + sc * (np.asarray(x) @ a @ bb)
    np.testing.assert_allclose(run(True), want, atol=1e-5)
    np.testing.assert_allclose(run(False), want_eval, atol=1e-5)  # no dropout in eval


def test_lora_matmul_gradients_and_frozen_kernel():
    """`lora_matmul` (the kernel W + s A B formed on the fly, a custom backward pass): value
    and gradients equal float64 autodiff-free formulas of the unmerged x W + s (x A) B,
    and with W frozen the compiled gradient computes no (in, out) weight gradient."""
    from jaxmed.kernels import cpu_dense
    from jaxmed.strategies.adapters import lora_matmul

    rng = np.random.default_rng(5)
    x, w, a, b, ct = (rng.standard_normal(s).astype(np.float32) for s in
                      [(2, 37, 48), (48, 80), (48, 8), (8, 80), (2, 37, 80)])
    w, a = w / 7, a / 7
    sc = 1.5
    loss = jax.jit(jax.value_and_grad(
        lambda x, w, a, b: jnp.sum(lora_matmul(x, w, a, b, sc) * ct), argnums=(0, 1, 2, 3)))
    v, (dx, dw, da, db) = loss(x, w, a, b)
    f64 = [np.asarray(v, np.float64) for v in (x, w, a, b, ct)]
    x2, w2, a2, b2, ct2 = (v.reshape(-1, v.shape[-1]) for v in f64)
    want = {"value": np.sum((x2 @ w2 + sc * (x2 @ a2) @ b2) * ct2),
            "dx": (ct2 @ (w2 + sc * a2 @ b2).T).reshape(x.shape), "dw": x2.T @ ct2,
            "da": sc * x2.T @ (ct2 @ b2.T), "db": sc * (x2 @ a2).T @ ct2}
    for name, got in zip(want, (v, dx, dw, da, db)):
        err = np.abs(np.asarray(got) - want[name]).max() / np.abs(want[name]).max()
        assert err <= 1e-5, (name, err)
    frozen_w = jax.jit(jax.grad(lambda a, b: jnp.sum(lora_matmul(x, w, a, b, sc) * ct),
                                argnums=(0, 1)))
    hlo = frozen_w.lower(a, b).compile().as_text()
    assert "f32[48,80]{1,0} custom-call" not in hlo
    if cpu_dense.available():  # the adapter's two rank-r products: A's and B's gradients
        assert hlo.count('custom_call_target="jaxmed_dense_wgrad"') == 2


# ---------------------------------------------------------------------------------------
# Merged export: plain weights that diffusers loads and that reproduce the adapted model


def _random_trainable(name, s, tiny):
    tr, fr = s.init(tiny.params, jax.random.PRNGKey(0))
    rng = np.random.default_rng(4)

    def perturb(path, v):
        key = getattr(path[-1], "key", "")
        v = np.asarray(v)
        if key == "difffit_gamma":
            return (1 + 0.3 * rng.standard_normal(v.shape)).astype(np.float32)
        if key == "spectral_shift":  # shifts up to a few singular values, some clipped by relu
            return (0.5 * rng.standard_normal(v.shape)).astype(np.float32)
        return (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(perturb, tr), fr


def _check_export(tiny, base, name, s, tr, fr, folder):
    adapted, ctx, _ = tiny.run(name, s, tr, fr)
    change = np.abs(adapted - base[0]).max() / np.abs(base[0]).max()
    assert change > 1e-2, change  # the adaptation does change the output

    exported = jax.device_get(s.export(tr, fr))
    assert set(exported) == {"unet", "text_encoder"}
    assert jax.tree_util.tree_structure(exported["unet"]) == \
        jax.tree_util.tree_structure(tiny.params["unet"])
    # jaxmed's base model on the exported weights
    plain, _, _ = tiny.run("unet", strategies.get("unet"), {"unet": exported["unet"]},
                           {"text_encoder": exported["text_encoder"]})
    assert np.abs(plain - adapted).max() <= TOL
    # diffusers on the exported folder
    weights.save_component(folder, "unet", tiny.ucfg, exported["unet"])
    out_t = tiny.torch_forward(tiny.torch_unet(os.path.join(folder, "unet")), ctx)
    err = np.abs(out_t - adapted).max()
    print(f"{name}: max |diffusers(merged export) - jaxmed adapted| = {err:.2e} "
          f"(the adaptation moves the output by {change:.1%} of its max)")
    assert err <= TOL


def test_merged_export_lora_dora(tiny, base, peft_case, tmp_path):
    c = peft_case
    _check_export(tiny, base, c["kind"], c["s"], c["trainable"], c["frozen"], str(tmp_path))


@pytest.mark.parametrize("name", ["difffit-orig", "svdiff"])
def test_merged_export(tiny, base, name, tmp_path):
    s = strategies.get(name)
    tr, fr = _random_trainable(name, s, tiny)
    _check_export(tiny, base, name, s, tr, fr, str(tmp_path))


# ---------------------------------------------------------------------------------------
# Bad input: errors that say what is valid


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(StrategyError) as e:
        strategies.get("loar")
    for n in strategies.names():
        assert n in str(e.value)
    assert len(strategies.names()) == 14 and strategies.STUDY[-1] == "difffit"


def test_unknown_option_lists_options():
    with pytest.raises(StrategyError, match=r"no option\(s\) \['ranks'\].*'rank'"):
        strategies.get("lora", ranks=4)


def test_target_matching_nothing_shows_what_it_was_matched_against(tiny):
    with pytest.raises(StrategyError) as e:
        strategies.get("lora", targets=("to_query",)).init(tiny.params, jax.random.PRNGKey(0))
    msg = str(e.value)
    assert "to_query" in msg and "down_blocks.0.attentions.0" in msg
    with pytest.raises(StrategyError, match="to_qq.*module names.*conv_in"):
        strategies.get("attn", targets=("to_qq",)).init(tiny.params, jax.random.PRNGKey(0))
    with pytest.raises(StrategyError, match="q_proj_x.*text_model.encoder"):
        strategies.get("lora", text_targets=("q_proj_x",)).init(tiny.params,
                                                                jax.random.PRNGKey(0))


def test_lora_on_a_conv_is_an_error(tiny):
    with pytest.raises(StrategyError, match="convolution.*proj_in"):
        strategies.get("lora", targets=("proj_in",)).init(tiny.params, jax.random.PRNGKey(0))


def test_other_bad_inputs(tiny, tmp_path):
    with pytest.raises(StrategyError, match="text_encoder"):
        strategies.get("text").init({"unet": tiny.params["unet"]}, jax.random.PRNGKey(0))
    with pytest.raises(StrategyError, match="does not train"):
        strategies.get("unet", lrs={"vae": 1e-6})
    with pytest.raises(StrategyError, match="rank"):
        strategies.get("lora", rank=0)
    with pytest.raises(StrategyError, match="no targets"):
        strategies.get("dora", targets=())
    s = strategies.get("lora", rank=4, alpha=8.0)
    tr, _ = s.init(tiny.params, jax.random.PRNGKey(0))
    s.save_peft(tr, str(tmp_path))
    with pytest.raises(PeftFormatError, match="r=4 but the strategy's rank is 8"):
        strategies.get("lora").load_peft(str(tmp_path), tiny.params)
    with pytest.raises(PeftFormatError, match="use_dora"):
        strategies.get("dora", rank=4, alpha=8.0).load_peft(str(tmp_path), tiny.params)
    with pytest.raises(PeftFormatError, match="not found"):
        s.load_peft(str(tmp_path / "nowhere"), tiny.params)


def test_config_builds_every_strategy():
    for name in strategies.names():
        cfg = load_config(f"configs/finetune.py:{name}")
        s = strategies.build_strategy(cfg.strategy)
        assert s.name == name and s.learning_rates()
