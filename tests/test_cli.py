"""The `cellserve` command: bench commands write the promised JSON; bad input exits with code 2."""

import json

import numpy as np
import pytest
import torch

from cellserve import models
from cellserve.cli import main
from cellserve import kernels
from cellserve.kernels import Bf16Dense
from cellserve.models.rnn import rnns_of


def test_bench_cells_writes_rows(tmp_path):
    out = tmp_path / "cells.json"
    assert main(["bench", "cells", "--cells", "lstm,sru", "--hidden", "16", "--batch", "1,3", "--seconds", "0.01",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["cell"], r["batch"]) for r in rows} == {("lstm", 1), ("lstm", 3), ("sru", 1), ("sru", 3)}
    for row in rows:
        assert {"cell", "hidden", "batch", "ours_us", "torch_us", "ort_us"} <= set(row)
        assert all(row[k] > 0 for k in ("ours_us", "torch_us", "ort_us"))


def test_bench_serving_writes_rows_and_plot(tmp_path):
    out = tmp_path / "serving.json"
    assert main(["bench", "serving", "--workloads", "treelstm", "--policies", "cellular,graph", "--rates", "30",
                 "--duration", "0.5", "--min-requests", "0", "--json", str(out), "--plots", str(tmp_path)]) == 0
    payload = json.loads(out.read_text())
    keys = {"workload", "policy", "rate_rps", "throughput_rps", "p50_ms", "p90_ms", "p99_ms", "completed",
            "refused", "lost", "steal_share"}
    assert all(keys <= set(r) for r in payload["rows"])
    # both policies on the native loop, and cellular again on the Python loop (trees have both)
    assert sorted((r["policy"], r["step_loop"]) for r in payload["rows"]) == [
        ("cellular", "native"), ("cellular", "python"), ("graph", "native")]
    assert all(r["lost"] == 0 and r["completed"] > 0 for r in payload["rows"])
    assert all(0.0 <= r["steal_share"] <= 1.0 for r in payload["rows"])  # (this is Linux)
    assert (tmp_path / "serving_treelstm.png").stat().st_size > 0


def test_bench_serving_runs_the_bf16_model_beside_the_fp32_one(tmp_path):
    out = tmp_path / "serving.json"
    assert main(["bench", "serving", "--workloads", "speller", "--policies", "cellular", "--rates", "50",
                 "--backends", "cellserve,cellserve-bf16", "--step-loops", "native", "--duration", "0.5",
                 "--min-requests", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert sorted(r["backend"] for r in rows) == ["cellserve", "cellserve-bf16"]
    assert all(r["lost"] == 0 and r["failed"] == 0 and r["completed"] > 0 for r in rows)


def test_repeated_traces_merge_into_medians_and_every_lost_request_counts():
    """bench serving --repeats: a row is the median of its traces, so one slow trace moves one vote; lost
    requests add up (one anywhere is a defect), and sustained is judged on the medians."""
    from cellserve.bench.serving import merged_row

    def row(p90, p99, refused=0, lost=0):
        return {"workload": "w", "policy": "cellular", "rate_rps": 10.0, "throughput_rps": 9.0, "p50_ms": 1.0,
                "p90_ms": p90, "p99_ms": p99, "refused": refused, "failed": 0, "lost": lost, "completed": 100,
                "mean_batch": 2.0, "overhead_us": 5.0, "overhead_share": 0.1, "padding_share": 0.0,
                "steal_share": 0.0, "sustained": True}

    merged = merged_row([row(10, 50), row(90, 1500, refused=3), row(20, 60)])
    assert (merged["p90_ms"], merged["p99_ms"], merged["refused"]) == (20, 60, 0)
    assert merged["p90_ms_each"] == [10, 90, 20] and merged["repeats"] == 3 and merged["completed"] == 300
    assert merged["sustained"]
    assert not merged_row([row(10, 50), row(90, 1500, refused=3), row(20, 1200, refused=1)])["sustained"]
    lost = merged_row([row(10, 50), row(10, 50, lost=1), row(10, 50)])
    assert lost["lost"] == 1 and not lost["sustained"]
    single = row(10, 50)
    assert merged_row([single]) is single


def test_stolen_time_is_steals_share_of_all_cpu_time(monkeypatch):
    """/proc/stat's first line: user nice system idle iowait irq softirq steal (ticks); the share is steal's
    part of their growth over the block."""
    from cellserve.bench import common

    readings = iter([[100, 0, 10, 500, 0, 0, 0, 40], [160, 0, 20, 520, 0, 0, 0, 50]])
    monkeypatch.setattr(common, "_cpu_ticks", lambda: next(readings))
    with common.StolenTime() as stolen:
        pass
    assert stolen.share == pytest.approx(10 / 100)
    monkeypatch.setattr(common, "_cpu_ticks", lambda: None)  # no /proc: unknown, not zero
    with common.StolenTime() as stolen:
        pass
    assert stolen.share is None


def test_bench_http_rounds_keep_every_latency_and_the_median_of_each_cpu_figure():
    from cellserve.bench.http import _median_of_rounds

    rounds = [{"latencies": np.array([1.0, 2.0]), "client_cpu_ms": 0.1, "server_cpu_ms": 0.5,
               "server_outside_kernels_us": outside} for outside in (90.0, 60.0, 300.0)]
    merged = _median_of_rounds(rounds)
    assert merged["latencies"].tolist() == [1.0, 2.0] * 3
    assert merged["server_outside_kernels_us"] == 90.0 and merged["server_cpu_ms"] == 0.5
    assert merged["outside_kernels_rounds_us"] == [90.0, 60.0, 300.0]


@pytest.mark.parametrize("argv", [
    ["bench", "cells", "--cells", "transformer"],
    ["bench", "cells", "--hidden", "abc"],
    ["bench", "cells", "--bits", "16"],
    ["bench", "gemm", "--dtype", "fp16"],
    ["bench", "serving", "--workloads", "nope"],
    ["bench", "serving", "--duration", "-1"],
    ["bench", "serving", "--min-requests", "-1"],
    ["bench", "serving", "--repeats", "0"],
    ["bench", "http", "--rounds", "0"],
    ["info", "/nonexistent/model.safetensors"],
    ["import-torch", "/nonexistent.pt", "/tmp/x.safetensors"],
    ["no-such-command"],
])
def test_bad_input_exits_with_code_2(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    assert code == 2
    assert "error" in capsys.readouterr().err


def test_import_torch_state_dict_round_trip(tmp_path, capsys):
    torch.manual_seed(0)
    gru = torch.nn.GRU(6, 9, num_layers=2, bidirectional=True)
    torch.save(gru.state_dict(), tmp_path / "gru.pt")
    assert main(["import-torch", str(tmp_path / "gru.pt"), str(tmp_path / "gru.safetensors")]) == 0
    model = models.load(tmp_path / "gru.safetensors")
    x = np.random.default_rng(0).standard_normal((5, 2, 6)).astype(np.float32)
    np.testing.assert_allclose(model.forward(x)[0], gru(torch.from_numpy(x))[0].detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    assert main(["info", str(tmp_path / "gru.safetensors")]) == 0
    assert '"bidirectional": true' in capsys.readouterr().out


def test_bench_multistep_writes_rows(tmp_path):
    out = tmp_path / "ms.json"
    assert main(["bench", "multistep", "--layers", "2", "--hidden", "32", "--k", "1,4", "--threads", "1",
                 "--seconds", "0.01", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    blocks = [r for r in rows if r["cell"] in ("sru", "qrnn") and "users" not in r]
    assert {(r["cell"], r["k"]) for r in blocks} == {("sru", 1), ("sru", 4), ("qrnn", 1), ("qrnn", 4)}
    assert all({"cell", "layers", "hidden", "k", "us_per_step", "speedup_vs_k1"} <= set(r) for r in rows)
    assert any(r["cell"] == "sru" and r.get("ort_us_per_step") for r in rows)


def test_bench_gemm_times_each_dtype_against_its_peers(tmp_path):
    """fp32, bf16 and int8 rows, each dtype with its own peers and its own measured peak."""
    out = tmp_path / "gemm.json"
    assert main(["bench", "gemm", "--dtype", "fp32,bf16,int8", "--m", "1,3", "--shapes", "64x96",
                 "--impls", "cellserve,torch,onnxruntime,onednn", "--seconds", "0.01", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert f"kernel path: {kernels.isa()}" in payload["machine"]  # every bench's JSON names CPU and path
    result = payload["dtypes"]
    impls = {dtype: {r["impl"] for r in result[dtype]["rows"]} for dtype in result}
    assert impls == {"fp32": {"cellserve", "torch", "onnxruntime", "onednn"}, "bf16": {"cellserve", "torch", "onednn"},
                     "int8": {"cellserve", "torch", "onnxruntime"}}
    for dtype, part in result.items():
        assert part["peak_gflops"] == max(r["gflops"] for r in part["rows"])
        assert {(r["m"], r["k"], r["n"]) for r in part["rows"]} == {(1, 64, 96), (3, 64, 96)}


@pytest.mark.parametrize("argv", [
    ["ocr", "eval", "/nonexistent/model.safetensors"],
    ["bench", "compress", "--qat", "3/8"],
    ["bench", "compress", "--sparsities", "1.5"],
])
def test_ocr_and_compress_bad_input_exits_with_code_2(argv, capsys):
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_ocr_quantize_and_read(tmp_path, capsys):
    from PIL import Image

    from cellserve.tasks import ocr_train
    from cellserve.tasks.ocr_data import render

    fp32 = tmp_path / "ocr.safetensors"
    models.save(ocr_train.to_runtime(ocr_train.build(16)), fp32)
    assert main(["ocr", "quantize", str(fp32), str(tmp_path / "int8.safetensors")]) == 0
    image = render("hello", np.random.default_rng(0))
    Image.fromarray((255 - image * 255).astype(np.uint8)).save(tmp_path / "line.png")  # dark ink on paper
    assert main(["ocr", "read", str(tmp_path / "int8.safetensors"), str(tmp_path / "line.png")]) == 0
    assert "line.png:" in capsys.readouterr().out
    assert main(["ocr", "read", str(tmp_path / "int8.safetensors"), str(fp32)]) == 2  # not an image
    Image.new("L", (1, 64), 255).save(tmp_path / "sliver.png")  # 1 px wide at height 32: no frame
    assert main(["ocr", "read", str(tmp_path / "int8.safetensors"), str(tmp_path / "sliver.png")]) == 2
    lm = tmp_path / "lm.safetensors"
    models.save(models.LanguageModel.random(10, 4, 8, seed=0), lm)
    assert main(["ocr", "read", str(lm), str(tmp_path / "line.png")]) == 2
    # bf16: the file holds bf16 matrices (loaded back as such) and reads the line as fp32 does
    half = tmp_path / "bf16.safetensors"
    assert main(["ocr", "quantize", str(fp32), str(half), "--bits", "bf16"]) == 0
    assert "bf16 weights" in capsys.readouterr().out
    loaded = models.load(half)
    assert all(isinstance(c.ih, Bf16Dense) for rnn in rnns_of(loaded) for c in rnn.cells)
    capsys.readouterr()
    main(["ocr", "read", str(fp32), str(tmp_path / "line.png")])
    main(["ocr", "read", str(half), str(tmp_path / "line.png")])
    fp32_line, bf16_line = capsys.readouterr().out.strip().splitlines()
    assert fp32_line == bf16_line


def test_bench_compress_writes_the_rows_and_plot(tmp_path):
    """A tiny end-to-end run: every scheme gets a row with the issue's keys, and the plot is written."""
    out = tmp_path / "compress.json"
    assert main(["bench", "compress", "--workdir", str(tmp_path / "work"), "--train-lines", "60", "--test-lines",
                 "10", "--hidden", "8", "--train-seconds", "1", "--finetune-seconds", "1", "--qat", "4/4",
                 "--sparsities", "0.5", "--student-hidden", "4", "--student-epochs", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {"fp32", "bf16", "int8-ptq", "int8-ptq-onnxruntime", "qat-w4a4", "prune-magnitude-50", "prune-blocks-75",
            "prune-units-half", "distilled-bilstm4"} <= {r["scheme"] for r in rows}
    keys = {"scheme", "weight_bits", "act_bits", "sparsity", "cer", "weight_bytes", "us_per_line", "speedup"}
    assert all(keys <= set(r) for r in rows)
    by_scheme = {r["scheme"]: r for r in rows}
    assert by_scheme["fp32"]["speedup"] == 1.0
    sizes = [by_scheme[s]["weight_bytes"] for s in ("qat-w4a4", "int8-ptq", "bf16", "fp32")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    assert out.with_suffix(".png").stat().st_size > 0
    assert (tmp_path / "work" / "ocr_qat-w4a4.safetensors").exists()


def test_progress_bars_show_on_a_terminal_only_and_quiet_turns_them_off(monkeypatch, tmp_path):
    import io
    import sys

    from cellserve import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert not progress.enabled()  # pytest's stderr is no terminal: bars stay silent
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(progress, "QUIET", False)
    with progress.bar("sweep", 4) as outer:
        outer.advance(note="first")
        with progress.bar("training", 10) as inner:  # joins the open display
            inner.update(10, "epoch 3")
            assert len(outer.progress.tasks) == 2 and inner.progress is outer.progress
        outer.grow(2)
        outer.advance(3)
        task = outer.progress.tasks[0]
        assert (task.completed, task.total, task.description) == (4, 6, "sweep: first")
    assert "sweep" in terminal.getvalue()
    # --quiet: the same commands, silent
    assert main(["bench", "serving", "--workloads", "treelstm", "--policies", "cellular", "--rates", "30",
                 "--duration", "0.2", "--quiet", "--json", str(tmp_path / "s.json")]) == 0
    assert progress.QUIET and not progress.enabled()
    with progress.bar("sweep", 4) as silent:
        silent.advance()
        assert silent.progress is None


def _silero_file():
    silero_vad = pytest.importorskip("silero_vad")
    import pathlib

    return str(pathlib.Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx")


@pytest.mark.parametrize("extra, says", [
    ([], "--set KEY=VALUE"),  # the newcomer's first try: the error says where the shape goes
    (["--set", "policy"], "expected KEY=VALUE"),
    (["--set", "bogus=1", "--set", "controls.sr=16000", "--set", "input_shapes.input=[-1,576]"], "bogus"),
    (["--config", "/nonexistent/config.json"], "--config /nonexistent/config.json"),
])
def test_a_single_file_without_its_config_or_with_a_bad_one_exits_2_saying_what_to_give(extra, says, capsys):
    assert main(["serve", _silero_file(), "--grpc-port", "0", *extra]) == 2
    assert says in capsys.readouterr().err


def test_serve_names_a_folder_or_file_or_packaged_model_and_config_goes_with_a_file_only(tmp_path, capsys):
    assert main(["serve", "no-such-model", "--grpc-port", "0"]) == 2
    assert "silero-vad" in capsys.readouterr().err  # (the packaged models are listed)
    assert main(["serve", str(tmp_path), "--grpc-port", "0", "--set", "max_batch=8"]) == 2
    assert "single model file" in capsys.readouterr().err


def test_command_line_config_sets_dotted_keys_over_the_file_with_json_values(tmp_path):
    from cellserve.server.config import command_line_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"controls": {"sr": 8000}, "policy": "graph", "max_batch": 4}))
    got = command_line_config(str(path), ["controls.sr=16000", "input_shapes.input=[-1,576]", "policy=cellular",
                                          "context.input=64", "step_loop=python"])
    assert got == {"controls": {"sr": 16000}, "policy": "cellular", "max_batch": 4,
                   "input_shapes": {"input": [-1, 576]}, "context": {"input": 64}, "step_loop": "python"}
