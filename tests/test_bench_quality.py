"""benchmarks/bench_quality.py: the row options, and that --sample-seeds averages distinct draws."""
import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_quality")


@pytest.mark.parametrize("argv", [["--rows", "ddim20,foo"], ["--sample-seeds", "0"], ["--device", "tpu"]]
                         + ([["--device", "cuda"]] if not torch.cuda.is_available() else []))
def test_bad_row_options_stop_with_an_error(argv, capsys, bench):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code != 0
    assert argv[0] in capsys.readouterr().err


class MeanScorer:
    """Stands in for the classifier: 'FD' is the draw's mean pixel, so each draw scores differently."""

    def __call__(self, images):
        return {"fd": float(np.asarray(images, dtype=np.float64).mean()), "recognized": 0.5, "speckled": 0.0}


def test_sample_seeds_average_distinct_draws(bench):
    from ddpmkit.config import Config, apply_overrides
    from ddpmkit.diffusion import Diffusion
    from ddpmkit.models import build_model

    cfg = apply_overrides(Config(), {"model": {"size": "tiny"}, "data": {"image_size": 16, "channels": 1}})
    torch.manual_seed(0)
    model = build_model(cfg.model, 1).eval()
    diffusion = Diffusion.from_config(cfg.diffusion, 16, 1)
    run = {"model": model, "diffusion": diffusion, "cfg": cfg, "train_s": None, "images": 0}
    args = bench.parse_args(["--n", "3", "--n-ddpm", "0", "--sample-seeds", "3", "--rows", "dpm10", "--seed", "4"])
    (row,) = bench.system_rows("ddpmkit", run, MeanScorer(), args)
    singles = [MeanScorer()(bench.sample_ddpmkit(run, "dpm++2m", 10, 3, False, seed))["fd"] for seed in (4, 5, 6)]
    assert row["draws"] == 3 and row["fd_draws"] == pytest.approx(singles)
    assert len(set(singles)) == 3  # the draws use different sampling seeds
    assert row["fd"] == pytest.approx(np.mean(singles))
    assert row["fd_sd"] == pytest.approx(np.std(singles, ddof=1))
    assert row["train_img_s"] is None
