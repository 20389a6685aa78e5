"""Config fuzzing: random and extreme values end in a valid config / run, or in one `ddpm: error:` line.

Two levels:

* `apply_overrides` + `validate` get arbitrary sections, keys and values (no training, so nothing
  is bounded there: huge, negative, NaN/inf, wrong types, unknown names, odd strings).
* `ddpm train` itself (`ddpmkit.cli.main`, in-process) gets random flags and `--set` pairs on top
  of a tiny 1-epoch run. Here a value that passes validation is *run*, so every strategy below
  produces, per field, either values that are invalid at any size (negative, zero, NaN, inf,
  wrong type: these may be as extreme as Hypothesis likes) or valid values inside a bound that
  keeps the run short and small (epochs <= 2, image_size <= 16, widths <= 16, timesteps <= 60,
  sample grids of <= 8 images, no big model presets, no data paths outside the test folder).
  Without that, a valid `epochs=10**9`, `image_size=10**6` or `diffusion.timesteps=10**10` would
  run for ever or exhaust memory -- which is correct behaviour, not a failure to find.

Inputs that crashed earlier versions (huge seeds, exotic devices, NUL bytes, non-string YAML keys,
argparse errors, line breaks in names, float32-overflowing lr) are pinned in `test_known_crashes`.
"""
import contextlib
import dataclasses
import io
import math
from typing import get_type_hints

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings, strategies as st

from ddpmkit import config
from ddpmkit.cli import TRAIN_FLAGS, main
from ddpmkit.config import Config, apply_overrides, from_dict, validate
from ddpmkit.errors import DdpmError

FIELDS = {name: get_type_hints(cls) for name, cls in config._SECTION_TYPES.items()}

WEIRD = ["", " ", "nan", "NaN", "-nan", "inf", "-inf", "+inf", "Infinity", "1e309", "-1e309", "1e-400", "0x10",
         "1_000", "١٢", "１２", "true", "false", "None", "null", "[]", "{}", "1,2,,3", ",", "-1", "-0", "0", "0.0",
         "9" * 40, "9" * 5000, "x" * 300, "\t", "\x00", "💥", "${HOME}", "%s%n", "'; rm -rf /", "../..", "/", ".",
         "..", "a=b", "tiny", "custom", "cosine", "v", "min_snr", "edm", "ddim", "posterior"]
# Line breaks inside names and string values are left out of the random strategies: several error
# messages quote such strings raw, so the message spans lines (pinned in test_known_crashes).
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
text = st.text(alphabet=st.characters(exclude_characters=LINE_BREAKS), max_size=12)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread (two contend on the shared 2-core machine); restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --- level 1: apply_overrides + validate, unbounded -------------------------------------------------

anything = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), text, st.sampled_from(WEIRD),
              st.integers().map(str), st.floats().map(repr)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=2),
    max_leaves=6)


@st.composite
def overrides(draw):
    out = {}
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(sorted(FIELDS)) | text)
        if section not in FIELDS or draw(st.integers(0, 9)) == 0:
            out[section] = draw(anything)  # unknown section, or a section that is not a table
            continue
        values = out.get(section)
        values = values if isinstance(values, dict) else {}
        for _ in range(draw(st.integers(1, 4))):
            key = draw(st.sampled_from(sorted(FIELDS[section])) | text)
            values[key] = draw(anything)
        out[section] = values
    return out


def _typed_ok(cfg: Config) -> None:
    for section, hints in FIELDS.items():
        for key, hint in hints.items():
            value = getattr(getattr(cfg, section), key)
            if hint is float:
                assert isinstance(value, float) and math.isfinite(value), (section, key, value)
            elif hint is int:
                assert isinstance(value, int) and not isinstance(value, bool), (section, key, value)
            elif hint is bool:
                assert isinstance(value, bool), (section, key, value)
            elif hint is str:
                assert isinstance(value, str), (section, key, value)
            else:
                assert isinstance(value, tuple) and all(type(v) is int for v in value), (section, key, value)


@settings(max_examples=300, deadline=None)
@given(overrides())
@example({"train": {"epochs": float("nan")}})
@example({"train": {"lr": "inf", "seed": -1}})
@example({"model": {"size": ["tiny"]}})
@example({"model": {"size": "tiny", "base_channels": "1e309"}})
@example({"data": {"image_size": "9" * 5000}})
@example({"model": {"channel_mults": "1,,2", "attn_levels": [[1]]}})
@example({"train": None})
@example({"diffusion": {"beta_start": True}})
def test_config_overrides_never_crash(ov):
    try:
        cfg = validate(apply_overrides(Config(), ov))
    except DdpmError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    _typed_ok(cfg)
    # a valid config survives the trip through a checkpoint (to_dict -> from_dict) unchanged
    again = validate(from_dict(cfg.to_dict()))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


# --- level 2: the CLI, on a tiny 1-epoch run ---------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("fuzzdata")
    for i in range(10):
        Image.new("RGB", (10, 12), (20 * i, 100, 255 - 20 * i)).save(root / f"{i}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    return root


def invalid_int():
    return st.integers(max_value=-1) | st.integers(max_value=-(10 ** 30))


def invalid_float():
    return st.sampled_from([float("nan"), float("inf"), float("-inf")]) | st.floats(max_value=-1e-9)


# field -> strategy of strings to pass (see the module docstring for the bounds)
def text_values(valid):
    return st.sampled_from(valid) | st.sampled_from(WEIRD) | text


INT_BOUNDED = {
    ("train", "epochs"): st.integers(0, 2) | invalid_int(),
    ("train", "batch_size"): st.integers(1, 10 ** 12) | st.integers(max_value=0),  # big batch = 1 batch
    ("train", "grad_accum"): st.integers(1, 10 ** 12) | st.integers(max_value=0),
    ("data", "image_size"): st.sampled_from([4, 6, 8, 12, 16]) | st.integers(max_value=3),
    ("data", "channels"): st.integers(),
    ("train", "warmup_steps"): st.integers(),
    ("train", "seed"): st.integers(-(10 ** 20), 2 ** 63 - 1),  # >= 2**64: see test_known_crashes
    ("train", "log_every"): st.integers(),
    ("train", "sample_every_epochs"): st.integers(0, 1) | invalid_int(),
    ("train", "sample_every_steps"): st.integers(2, 10 ** 12) | st.integers(max_value=0),
    ("train", "sample_steps"): st.integers(),  # capped at timesteps
    ("train", "sample_n"): st.integers(1, 8) | st.integers(max_value=0),
    ("train", "ckpt_every_steps"): st.integers(),
    ("train", "max_nonfinite_steps"): st.integers(),
    ("diffusion", "timesteps"): st.integers(1, 60) | st.integers(max_value=0),
    ("model", "base_channels"): st.integers(1, 16) | st.integers(max_value=0),
    ("model", "num_heads"): st.integers(1, 16) | st.integers(max_value=0),
    ("model", "time_dim"): st.integers(2, 64) | st.integers(max_value=1),
}
FLOAT_ANY = [("train", "weight_decay"), ("train", "grad_clip"), ("train", "ema_decay"),
             ("train", "ckpt_every_minutes"), ("model", "dropout"), ("diffusion", "beta_start"),
             ("diffusion", "beta_end"), ("diffusion", "min_snr_gamma"), ("diffusion", "vlb_weight"),
             ("diffusion", "sigma_data"), ("diffusion", "p_mean"), ("diffusion", "p_std"),
             ("diffusion", "sigma_min"), ("diffusion", "sigma_max")]
STR_VALUES = {
    ("model", "size"): ["tiny", "custom", "huge", "seed ", "TINY"],  # seed/small/cifar: large models
    ("diffusion", "schedule"): ["linear", "cosine", "sigmoid", "exp"],
    ("diffusion", "prediction"): ["eps", "x0", "v", "score"],
    ("diffusion", "loss_weighting"): ["none", "min_snr", "p2"],
    ("diffusion", "variance"): ["beta", "posterior", "learned"],
    ("diffusion", "objective"): ["vp", "edm", "ve"],
    ("train", "sample_sampler"): ["ddpm", "ddim", "dpm++2m", "heun", "euler", "nope"],
    # devices torch does not know, or knows but cannot use here (meta, xpu, ...: test_known_crashes)
    ("train", "device"): ["cpu", "auto", "cpu:0", "cuda", "cuda:0", "cuda:7", "mps", "CPU", "gpu", "tpu", "",
                          "0", "cuda:-1", " cpu"],
    ("train", "run_name"): ["ok", "", ".", "..", "a/b", "a\\b", "x" * 300, " ", "-", "\n", "名前", "--epochs"],
    ("train", "workdir"): ["", "w", "sub/dir", "x" * 300, "FILE"],
    ("data", "path"): ["FOLDER", "", "missing", "FILE", "builtin:", "builtin:nope", "FOLDER/0.png"],
    ("data", "cache_dir"): ["", "cache", "FILE", "x" * 300],
}
BOOLS = [("data", "hflip"), ("train", "bf16"), ("diffusion", "zero_terminal_snr"), ("diffusion", "learn_sigma"),
         ("diffusion", "clip_denoised")]
TUPLES = [("model", "channel_mults"), ("model", "attn_levels")]
FLAG_OF = {(section, key): flag for flag, section, key, _, _ in TRAIN_FLAGS}


@st.composite
def cli_option(draw):
    kind = draw(st.integers(0, 5))
    if kind == 0:
        field = draw(st.sampled_from(sorted(INT_BOUNDED)))
        value = str(draw(INT_BOUNDED[field]))
    elif kind == 1:
        field = draw(st.sampled_from(FLOAT_ANY + [("train", "lr")]))
        # lr above float32's range crashes inside AdamW: bounded here, pinned in test_known_crashes
        floats = st.floats(max_value=1e30) if field == ("train", "lr") else st.floats()
        value = repr(draw(floats | st.sampled_from([0.0, -0.0, 1e-300, 1e30, 0.5, 0.999, math.nan, math.inf])))
    elif kind == 2:
        field = draw(st.sampled_from(sorted(STR_VALUES)))
        value = draw(st.sampled_from(STR_VALUES[field]))
    elif kind == 3:
        field = draw(st.sampled_from(BOOLS))
        value = draw(text_values(["true", "false", "1", "0", "yes", "off"]))
    elif kind == 4:
        field = draw(st.sampled_from(TUPLES))
        value = draw(st.sampled_from(["1,2", "1", "", "0,1", "-1", "1,2,3", "2,2", "1,1,1,1", "a,b", "1.5", "[1]"])
                     | st.lists(st.integers(-2, 3), max_size=3).map(lambda v: ",".join(map(str, v))))
    else:  # unknown keys and malformed --set items
        return ["--set", draw(st.sampled_from(["train.bogus=1", "nosuch.key=1", "train=1", "=", ".=", "train.=3",
                                               "model.size", "a.b.c=1", "diffusion.Timesteps=5", "data.path"]))]
    section, key = field
    flag = FLAG_OF.get(field)
    if flag is not None and draw(st.booleans()):
        return [f"{flag}={value}"]  # the --flag=VALUE form, so that values starting with '-' stay values
    return ["--set", f"{section}.{key}={value}"]


def _base(folder):
    return ["train", "--data", str(folder), "--run-name", "fz", "--epochs", "1", "--batch-size", "4",
            "--image-size", "8", "--set", "model.size=custom", "--set", "model.base_channels=8",
            "--set", "model.channel_mults=1,2", "--set", "model.attn_levels=1", "--set", "model.time_dim=16",
            "--set", "model.num_heads=2", "--timesteps", "20", "--sample-every", "0", "--sample-steps", "4",
            "--set", "train.sample_n=2", "--device", "cpu", "--no-progress"]


def _resolve(option, folder, tmp):
    names = {"FOLDER": str(folder), "FILE": str(tmp / "a-file")}
    out = []
    for part in option:
        for name, path in names.items():
            part = part.replace(f"={name}", f"={path}")
        out.append(part)
    return out


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def check_cli_contract(code, out, err):
    assert "Traceback" not in err, err
    if code == 0:
        return
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm: error: "), err


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.lists(cli_option(), min_size=1, max_size=3))
@example(options=[["--epochs=-1"]])
@example(options=[["--lr=nan"]])
@example(options=[["--set", "data.image_size=1000000000"]])
@example(options=[["--set", "diffusion.timesteps=10000000000000"], ["--set", "data.channels=2"]])
@example(options=[["--set", "train.device=cuda"]])
@example(options=[["--set", "data.cache_dir=FILE"]])
@example(options=[["--set", "train.run_name=x" + "x" * 299]])
@example(options=[["--set", "train.workdir=x" + "x" * 299]])
def test_cli_fuzz_exit_0_or_one_line_error(folder, tmp_path_factory, monkeypatch, options):
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "a-file").write_text("a file, not a folder")
    monkeypatch.chdir(tmp)  # relative workdirs, caches and run names land here
    argv = _base(folder) + [part for option in options for part in _resolve(option, folder, tmp)]
    code, out, err = run_cli(argv)
    event(f"exit {code}")
    check_cli_contract(code, out, err)


# --- inputs that once crashed; each now ends in a one-line error or a valid run --------------------

KNOWN = {
    "seed-2**64": (["--seed", str(2 ** 64)], "config.validate accepts any seed >= 0; torch.manual_seed raises "
                   "ValueError for seeds >= 2**64 (fix: _check(0 <= t.seed < 2**63, ...))"),
    "device-meta": (["--device", "meta"], "train.resolve_device accepts every torch device type; 'meta' "
                    "crashes in the loop (fix: reject device.type not in cpu/cuda/mps)"),
    "device-xpu": (["--device", "xpu"], "train.resolve_device accepts 'xpu' (and hpu, xla, lazy, ...); "
                   "AssertionError 'Torch not compiled with XPU enabled' when building the diffusion"),
    "run-name-NUL": (["--run-name", "a\x00b"], "config.validate lets NUL bytes into run_name; ValueError "
                     "'embedded null byte' from pathlib"),
    "workdir-NUL": (["--workdir", "w\x00"], "config.validate lets NUL bytes into workdir; ValueError"),
    "run-name-surrogate": (["--run-name", "a\udcff"], "a run name with an undecodable byte (as argv gives for "
                           "non-UTF-8 input) reaches TensorBoard, which raises UnicodeEncodeError"),
    "yaml-int-key": (["--config", "INTKEY.yaml"], "config._unknown passes a non-string YAML key to "
                     "difflib.get_close_matches: TypeError"),
    "argparse-int": (["--epochs", "1.5"], "argparse type errors print the usage block and 'ddpm train: error:' "
                     "(two+ lines), not one 'ddpm: error:' line"),
    "argparse-unknown-flag": (["--epochz", "3"], "argparse: unrecognized arguments, multi-line usage output"),
    "newline-in-key": (["--set", "train.a\nb=1"], "an unknown key is quoted raw in config._unknown, so a line "
                       "break in it splits the one-line error (fix: format names and values with !r, or escape "
                       "line breaks once in cli.main)"),
    "newline-in-value": (["--schedule", "lin\near"], "config.validate quotes string values raw "
                         "(\"got '{d.schedule}'\"): a line break splits the one-line error"),
    "lr-1e39": (["--lr", "1e39"], "config.validate accepts any finite lr; above float32's max AdamW raises "
                "RuntimeError 'value cannot be converted to type float without overflow'"),
}


@pytest.mark.parametrize("case", list(KNOWN))
def test_known_crashes(folder, tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "INTKEY.yaml").write_text("train:\n  1: 2\n")
    code, out, err = run_cli(_base(folder) + [a.replace("INTKEY.yaml", str(tmp_path / "INTKEY.yaml"))
                                              for a in KNOWN[case][0]])
    check_cli_contract(code, out, err)
