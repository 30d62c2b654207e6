"""Downstream classifier and its metrics: sklearn parity, learning, architectures, regimes."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmed.eval import classifier as C
from jaxmed.eval import metrics as M
from jaxmed.eval.classifier import train as CT

# ---------------------------------------------------------------------------- metrics


def _tied_data(seed=0, n=300, labels=6):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (n, labels))
    p = np.round(rng.random((n, labels)) * 0.5 + 0.3 * y, 1)  # coarse: many ties
    return y, p


def test_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    y, p = _tied_data()
    per = M.auroc_per_label(y, p)
    ref = [roc_auc_score(y[:, k], p[:, k]) for k in range(y.shape[1])]
    np.testing.assert_allclose(per, ref, rtol=0, atol=1e-12)
    macro, excluded = M.macro_auroc(y, p)
    assert excluded == 0
    assert abs(macro - roc_auc_score(y, p, average="macro")) < 1e-12


def test_single_class_label_is_nan_and_excluded():
    from sklearn.metrics import roc_auc_score

    y, p = _tied_data(1)
    y[:, 2] = 0
    y[:, 4] = 1
    per = M.auroc_per_label(y, p)
    assert np.isnan(per[2]) and np.isnan(per[4])
    macro, excluded = M.macro_auroc(y, p)
    assert excluded == 2
    keep = [0, 1, 3, 5]
    assert abs(macro - np.mean([roc_auc_score(y[:, k], p[:, k]) for k in keep])) < 1e-12
    s = M.summarize(y, p, list("abcdef"))
    assert s["n_auroc_excluded"] == 2 and s["auroc_excluded"] == ["c", "e"]
    assert math.isnan(s["auroc"]["c"]) and s["macro_auroc"] == macro


def test_f1_accuracy_and_best_thresholds_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    y, p = _tied_data(2)
    y[:, 3] = 0  # no positives: F1 is 0 (sklearn's zero_division default)
    p[:, 3] = 0.1
    with pytest.warns(Warning):  # sklearn's UndefinedMetricWarning
        ref = f1_score(y, p >= 0.5, average=None)
    np.testing.assert_allclose(M.f1_per_label(y, p), ref, atol=1e-15)
    t = M.best_thresholds(y, p)
    assert t[3] == 0.5  # no positives: the default
    f1_t = M.f1_per_label(y, p, t)
    for k in (0, 1, 2, 4, 5):
        assert f1_t[k] == pytest.approx(f1_score(y[:, k], p[:, k] >= t[k]), abs=1e-15)
        # no threshold does better on the same data
        grid = np.unique(p[:, k])
        best = max(f1_score(y[:, k], p[:, k] >= g) for g in grid)
        assert f1_t[k] == pytest.approx(best, abs=1e-15)
        assert f1_t[k] >= M.f1_per_label(y, p)[k]
    acc = M.accuracy_per_label(y, p)
    np.testing.assert_allclose(acc, [accuracy_score(y[:, k], p[:, k] >= 0.5) for k in range(6)])
    assert M.subset_accuracy(y, p) == accuracy_score(y, (p >= 0.5).astype(int))
    s = M.summarize(y, p, thresholds=t)
    assert s["macro_f1_best"] == pytest.approx(f1_t.mean())


def test_metrics_reject_bad_input():
    y, p = _tied_data()
    with pytest.raises(ValueError, match="different shapes"):
        M.auroc_per_label(y[:, :3], p)
    with pytest.raises(ValueError, match="0/1"):
        M.auroc_per_label(y * 2, p)
    p2 = p.copy()
    p2[5, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.macro_auroc(y, p2)
    with pytest.raises(ValueError, match="label names"):
        M.summarize(y, p, ["a"])


# ---------------------------------------------------------------------------- data


def blob_task(n, seed, size=32, labels=4, noise=0.15):
    """Label k present <-> a bright blob somewhere in region k (quadrants), plus noise."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < 0.4).astype(np.float32)
    x = 0.3 + noise * rng.standard_normal((n, size, size)).astype(np.float32)
    h = size // 2
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        for k in np.nonzero(y[i])[0]:
            cy = (k // 2) * h + rng.uniform(4, h - 4)
            cx = (k % 2) * h + rng.uniform(4, h - 4)
            x[i] += 0.6 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
    return np.clip(x, 0, 1), y


TINY = C.ClassifierConfig(
    arch="small_cnn", image_size=32, num_labels=4, widths=(16, 32, 32), batch_size=32,
    lr=3e-3, weight_decay=1e-4, eval_batch_size=128,
)


@functools.lru_cache(maxsize=1)
def _data():
    return blob_task(320, 0), blob_task(160, 1)


@functools.lru_cache(maxsize=1)
def _trained():
    (xt, yt), (xv, yv) = _data()
    cfg = TINY.replace(steps=150, eval_every=50)
    return C.train_classifier(cfg, xt, yt, xv, yv, progress=False)


# ---------------------------------------------------------------------------- learning


def test_small_cnn_learns_separable_task():
    clf = _trained()
    xs, ys = blob_task(160, 2)  # held out from training and model selection
    s = clf.evaluate(xs, ys)
    assert s["macro_auroc"] > 0.95, s
    assert clf.best_step in (50, 100, 150)
    assert [h["step"] for h in clf.history] == [50, 100, 150]
    assert clf.features(xs[:5]).shape == (5, 32)
    # [-1, 1] input of the same images gives the same predictions (uint8 storage inside)
    np.testing.assert_allclose(clf.predict_proba(xs[:8] * 2 - 1), clf.predict_proba(xs[:8]))


def test_save_load_round_trip(tmp_path):
    clf = _trained()
    xs, _ = blob_task(20, 3)
    path = clf.save(str(tmp_path / "clf"))
    clf.save(path)  # overwriting an existing save works
    back = C.TrainedClassifier.load(path)
    assert back.config == clf.config and back.best_step == clf.best_step
    np.testing.assert_array_equal(back.predict_proba(xs), clf.predict_proba(xs))
    np.testing.assert_array_equal(back.features(xs), clf.features(xs))
    with pytest.raises(FileNotFoundError, match="not a saved classifier"):
        C.TrainedClassifier.load(str(tmp_path))


def test_bad_input_is_named():
    x, y = blob_task(8, 4)
    cfg = TINY.replace(steps=1)
    with pytest.raises(ValueError, match="label columns"):
        C.train_classifier(cfg, x, y[:, :3], progress=False)
    with pytest.raises(ValueError, match="counts differ"):
        C.train_classifier(cfg, x[:7], y, progress=False)
    bad = x.copy()
    bad[3, 5, 5] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in 1 image\(s\), e.g. index \[3\]"):
        C.train_classifier(cfg, bad, y, progress=False)
    with pytest.raises(ValueError, match="0/1"):
        C.train_classifier(cfg, x, y - 1, progress=False)
    with pytest.raises(ValueError, match="must lie in"):
        C.prepare_images(x * 3, 32)
    with pytest.raises(ValueError, match="unknown keys"):
        C.ClassifierConfig.from_dict({"archh": "resnet50"})
    with pytest.raises(ValueError, match="arch"):
        C.ClassifierConfig(arch="vgg")


def test_prepare_images_resizes_and_greys():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    out = C.prepare_images(rgb, 32)
    assert out.shape == (3, 32, 32, 1) and out.dtype == np.uint8
    grey = C.prepare_images(rgb.mean(-1).astype(np.float32) / 255.0, 32)
    assert np.abs(out.astype(int) - grey.astype(int)).max() <= 1


# ---------------------------------------------------------------------------- architectures


@pytest.mark.parametrize(
    "arch,model,count,dim",
    [("resnet50", C.ResNet50(1000), 25_557_032, 2048),
     ("densenet121", C.DenseNet121(1000), 7_978_856, 1024)],
)
def test_standard_architectures(arch, model, count, dim):
    assert C.count_params(model) == count
    x = jax.ShapeDtypeStruct((2, 64, 64, 1), jnp.float32)
    v = C.abstract_variables(model)
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, method="features"), v, x)
    assert feats.shape == (2, dim)
    cfg = C.ClassifierConfig(arch=arch, image_size=64, num_labels=5)
    assert C.feature_dim(cfg) == dim
    # the full train step traces (compiling it is slow on CPU: the slow test does that)
    model5 = C.build_model(cfg)
    v5 = C.abstract_variables(model5)
    tx = CT._optimizer(cfg)
    state = {"step": jnp.zeros((), jnp.int32), "params": v5["params"],
             "batch_stats": v5["batch_stats"], "opt_state": jax.eval_shape(tx.init, v5["params"])}
    step = CT._train_step_fn(CT._step_key(cfg))
    args = (state, jax.ShapeDtypeStruct((2, 64, 64, 1), jnp.uint8),
            jax.ShapeDtypeStruct((2, 5), jnp.float32), jnp.ones(5), jnp.float32(1e-3),
            C.prng_key(0))
    new_state, loss = jax.eval_shape(step.__wrapped__, *args)
    assert loss.shape == () and jax.tree_util.tree_structure(new_state) == \
        jax.tree_util.tree_structure(state)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet50", "densenet121"])
def test_standard_architectures_train_step_runs(arch):
    """The full-depth networks compile and take a real train step (slow on CPU)."""
    x, y = blob_task(2, 5, labels=3)
    cfg = C.ClassifierConfig(arch=arch, image_size=32, num_labels=3, batch_size=2, steps=1)
    clf = C.train_classifier(cfg, x, y, progress=False)
    assert clf.predict_proba(x).shape == (2, 3)
    assert np.isfinite(clf.history[0]["train_loss"])


# ---------------------------------------------------------------------------- torchvision


def _torch_resnet(torch, stage_sizes, num_classes):
    nn = torch.nn

    class Bottleneck(nn.Module):
        def __init__(self, inp, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(inp, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.downsample = None
            if stride != 1 or inp != planes * 4:
                self.downsample = nn.Sequential(nn.Conv2d(inp, planes * 4, 1, stride, bias=False),
                                                nn.BatchNorm2d(planes * 4))

        def forward(self, x):
            r = torch.relu
            out = self.bn3(self.conv3(r(self.bn2(self.conv2(r(self.bn1(self.conv1(x))))))))
            return r(out + (self.downsample(x) if self.downsample is not None else x))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            inp = 64
            for i, n in enumerate(stage_sizes):
                blocks = []
                for j in range(n):
                    blocks.append(Bottleneck(inp, 64 * 2**i, 2 if i > 0 and j == 0 else 1))
                    inp = 64 * 2**i * 4
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.fc = nn.Linear(inp, num_classes)

        def forward(self, x):
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            for i in range(len(stage_sizes)):
                x = getattr(self, f"layer{i + 1}")(x)
            return self.fc(x.mean((2, 3)))

    return ResNet()


def _torch_densenet(torch, blocks, growth, init, num_classes):
    nn = torch.nn
    from collections import OrderedDict

    class Layer(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.norm1 = nn.BatchNorm2d(c)
            self.conv1 = nn.Conv2d(c, 4 * growth, 1, bias=False)
            self.norm2 = nn.BatchNorm2d(4 * growth)
            self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

        def forward(self, x):
            y = self.conv2(torch.relu(self.norm2(self.conv1(torch.relu(self.norm1(x))))))
            return torch.cat([x, y], 1)

    feats = OrderedDict(conv0=nn.Conv2d(3, init, 7, 2, 3, bias=False),
                        norm0=nn.BatchNorm2d(init), relu0=nn.ReLU(),
                        pool0=nn.MaxPool2d(3, 2, 1))
    c = init
    for i, n in enumerate(blocks):
        layers = OrderedDict()
        for j in range(n):
            layers[f"denselayer{j + 1}"] = Layer(c)
            c += growth
        feats[f"denseblock{i + 1}"] = nn.Sequential(layers)
        if i < len(blocks) - 1:
            feats[f"transition{i + 1}"] = nn.Sequential(OrderedDict(
                norm=nn.BatchNorm2d(c), relu=nn.ReLU(),
                conv=nn.Conv2d(c, c // 2, 1, bias=False), pool=nn.AvgPool2d(2, 2)))
            c //= 2
    feats["norm5"] = nn.BatchNorm2d(c)

    class DenseNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(feats)
            self.classifier = nn.Linear(c, num_classes)

        def forward(self, x):
            return self.classifier(torch.relu(self.features(x)).mean((2, 3)))

    return DenseNet()


@pytest.mark.parametrize("arch", ["resnet", "densenet"])
def test_torchvision_state_dict_parity(torch, arch):
    """torchvision-named weights load and give torch's eval-mode logits (reduced depth)."""
    if arch == "resnet":
        tm = _torch_resnet(torch, (1, 1, 1, 1), 5)
        model = C.ResNet(num_labels=5, stage_sizes=(1, 1, 1, 1))
    else:
        tm = _torch_densenet(torch, (2, 1, 1, 1), 8, 16, 5)
        model = C.DenseNet(num_labels=5, block_config=(2, 1, 1, 1), growth_rate=8,
                           num_init_features=16)
    g = torch.Generator().manual_seed(0)
    for name, buf in tm.named_buffers():
        if "running_mean" in name:
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
        elif "running_var" in name:
            buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    for name, p in tm.named_parameters():
        if p.ndim == 1:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name
                                                                   or "bn" in name else 0.0))
    tm.eval()
    x = np.random.default_rng(0).random((2, 33, 33, 1)).astype(np.float32)  # odd size
    v = C.load_torchvision_state_dict(C.abstract_variables(model), tm.state_dict())
    ours = np.asarray(jax.jit(model.apply)(v, jnp.asarray(x)))
    xt = np.repeat(x, 3, -1)
    xt = (xt - np.array(C.IMAGENET_MEAN, np.float32)) / np.array(C.IMAGENET_STD, np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(xt.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)

    # train mode: BatchNorm uses batch statistics and updates the running ones; finite grads
    def loss(params):
        out, upd = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                               train=True, mutable=["batch_stats"])
        return jnp.mean(out**2), upd

    (l0, upd), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])
    assert np.isfinite(float(l0))
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(g))
    m0 = jax.tree_util.tree_leaves(v["batch_stats"])
    m1 = jax.tree_util.tree_leaves(upd["batch_stats"])
    assert all(not np.allclose(a, b) for a, b in zip(m0, m1))

    # a head of another shape is kept (with a warning); a missing tensor is an error
    sd = dict(tm.state_dict())
    head = "fc" if arch == "resnet" else "classifier"
    good = (sd[f"{head}.weight"], sd[f"{head}.bias"])
    sd[f"{head}.weight"], sd[f"{head}.bias"] = torch.zeros(7, good[0].shape[1]), torch.zeros(7)
    with pytest.warns(UserWarning, match="keeping the initial head"):
        C.load_torchvision_state_dict(v, sd)
    sd[f"{head}.weight"], sd[f"{head}.bias"] = good
    victim = next(k for k in sd if k.endswith("conv2.weight"))
    del sd[victim]
    with pytest.raises(ValueError, match="missing from the state dict: .*conv2.kernel"):
        C.load_torchvision_state_dict(v, sd)


# ---------------------------------------------------------------------------- regimes


def test_run_regimes_rows_and_determinism():
    (xt, yt), _ = _data()
    xs, ys = blob_task(96, 7)
    test = blob_task(96, 8)
    cfg = TINY.replace(steps=60, eval_every=60)
    kw = dict(fractions=(0.05, 1.0), modes=("real", "synthetic", "real+synthetic"),
              repeats=1, config=cfg)
    rows = C.run_regimes((xt, yt), (xs, ys), test, **kw)
    assert [(r["mode"], r["fraction"]) for r in rows] == [
        ("real", 0.05), ("real", 1.0), ("synthetic", None), ("real+synthetic", 0.05),
        ("real+synthetic", 1.0)]
    by = {(r["mode"], r["fraction"]): r for r in rows}
    assert by[("real", 0.05)]["n_real"] == 16 and by[("real", 1.0)]["n_real"] == 320
    assert by[("synthetic", None)]["n_train"] == 96
    assert by[("real+synthetic", 0.05)]["n_train"] == 16 + 96
    for r in rows:
        assert set(r["auroc"]) == set(cfg.labels) and set(r["f1"]) == set(cfg.labels)
        assert 0 <= r["macro_auroc"] <= 1 and r["n_test"] == 96
    # more real data does not hurt on the separable task
    assert by[("real", 1.0)]["macro_auroc"] >= by[("real", 0.05)]["macro_auroc"] - 0.02
    # same seed, same numbers
    again = C.run_regimes((xt, yt), (xs, ys), test, **{**kw, "modes": ("real",),
                                                       "fractions": (0.05,)})
    assert again[0]["auroc"] == by[("real", 0.05)]["auroc"]


def test_subset_order_keeps_a_positive_of_every_label():
    rng = np.random.default_rng(0)
    y = np.zeros((200, 5))
    y[rng.choice(200, 3, replace=False), 4] = 1  # a rare label
    y[:, :4] = rng.random((200, 4)) < 0.3
    order = C.subset_order(y, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(200))
    assert (y[order[:5]].sum(axis=0) > 0).all()
    again = C.subset_order(y, np.random.default_rng(1))
    np.testing.assert_array_equal(order, again)


def test_scaled_validation_follows_the_real_fraction():
    """With scale_val, a run at real fraction f selects on max(f x N_val, labels) validation
    images whose head covers every label; synthetic-only runs select on none."""
    from jaxmed.eval.classifier.regimes import _scaled_val

    rng = np.random.default_rng(0)
    y = (rng.random((200, 4)) < 0.3).astype(np.float32)
    x = np.arange(200)
    for f, n in ((0.01, 4), (0.1, 20), (0.5, 100), (1.0, 200)):
        xv, yv = _scaled_val(x, y, f, seed=3)
        assert len(xv) == n and (yv.sum(axis=0) > 0).all(), f
    assert _scaled_val(x, y, None, seed=3) == (None, None)
    # nested across fractions of one seed (prefixes of one order)
    small, _ = _scaled_val(x, y, 0.1, seed=3)
    big, _ = _scaled_val(x, y, 0.5, seed=3)
    assert set(small) <= set(big)


def test_one_compiled_shape_and_init_for_every_set_size():
    # The study scores validation subsets of many sizes: each is padded to the eval batch
    # (one compiled shape, docs/STUDY.md "Where jaxmed departs from the study" scales them),
    # and every classifier of an architecture shares one jitted initialiser.
    clf = _trained()
    bs = clf.config.eval_batch_size
    xs, _ = blob_task(bs + 1, 5)
    shapes = []

    def fn(variables, xb):
        shapes.append(xb.shape)
        return clf.predict_proba(xb, batch_size=xb.shape[0])

    for n in (3, 9, bs + 1):
        out = C.trained._batched(fn, None, xs[:n], bs)
        np.testing.assert_allclose(out, clf.predict_proba(xs[:n]), atol=1e-6)
    assert set(shapes) == {(bs, *xs.shape[1:])}
    CT._init_fn.cache_clear()
    a = CT.init_variables(TINY)
    b = CT.init_variables(TINY.replace(seed=TINY.seed, steps=7))
    assert CT._init_fn.cache_info().misses == 1 and CT._init_fn.cache_info().hits == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
