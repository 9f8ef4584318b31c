"""`cellserve bench compress`: the accuracy/speed trade-off of compressing the OCR BiLSTM-CTC recognizer.

Trains the fp32 model (or reuses the one in --workdir), then derives every compressed variant from it:
post-training int8, quantization-aware fine-tuning at several weight/activation bit-widths, magnitude,
block (16 x 1, run by the block-sparse kernel) and hidden-unit pruning with fine-tuning, and a distilled
small student (beside the same student trained without the teacher). Each row: character error rate on held-out lines, the bytes of weights our runtime
holds, and the median microseconds to recognize a line on one thread in our runtime.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np

from cellserve import models
from cellserve.progress import bar
from cellserve.bench.common import console, limit_threads, print_table, write_json
from cellserve.families.ocr import recognize
from cellserve.models.ocr import OCRModel

DEFAULT_QAT = ((8, 8), (4, 8), (4, 4), (2, 8), (2, 4), (1, 8))


def us_per_line(model, images, repeats: int = 5) -> float:
    """Median over repeats of the mean time per line (one thread)."""
    return time_models([model], images, repeats)[0]


def time_models(candidates: list, images, repeats: int = 7) -> list[float]:
    """Median microseconds per line of each model on one thread. Rounds interleave the models, so drift
    in the machine's speed (other tenants, turbo) hits all of them alike."""
    samples: list[list[float]] = [[] for _ in candidates]
    with limit_threads(1):
        for model in candidates:
            recognize(model, images[0])
        for _ in range(repeats):
            for model, mine in zip(candidates, samples):
                start = time.perf_counter()
                for image in images:
                    recognize(model, image)
                mine.append((time.perf_counter() - start) / len(images) * 1e6)
    return [float(np.median(m)) for m in samples]


def run(workdir="cellserve-compress", train_lines: int = 4000, test_lines: int = 400, hidden: int = 128,
        train_seconds: float = 420, finetune_seconds: float = 90, qat=DEFAULT_QAT, sparsities=(0.5, 0.75, 0.9),
        block_sparsities=(0.75,),
        student_hidden: int = 48, student_epochs: int = 20, timing_lines: int = 60, json_path=None,
        plot_path=None, seed: int = 0) -> list[dict]:
    import torch

    from cellserve.tasks import ocr_train as ot
    from cellserve.tasks.ocr_data import make_datasets
    from cellserve.compress.qat import QuantSpec
    from cellserve.compress.quantize import bf16_weights, quantize_dynamic
    from cellserve.interop.onnx_export import use_onnxruntime

    torch.set_num_threads(2)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = lambda msg: console.log(msg)  # noqa: E731
    # models added (fp32, bf16, int8, 2 ONNX Runtime, fine-tuned fp32, QAT, pruned, 3 unit-pruned, 2 students), then
    # timing
    planned = 11 + len(qat) + len(sparsities) + len(block_sparsities) + 1
    with bar("compress", planned) as shown:
        log(f"rendering {train_lines} training and {test_lines} held-out lines")
        train_set, test_set = make_datasets(train_lines, test_lines, seed)
        timing_images = test_set.images[:timing_lines]
        rows: list[dict] = []
        runtime_models: list = []

        def add(scheme, module_or_model, weight_bits=32, act_bits=32, sparsity=0.0, save=True, **extra):
            model = module_or_model if isinstance(module_or_model, OCRModel) else ot.to_runtime(module_or_model)
            if save:
                models.save(model, workdir / f"ocr_{scheme}.safetensors")
            row = {"scheme": scheme, "backend": "cellserve", "weight_bits": weight_bits, "act_bits": act_bits,
                   "sparsity": sparsity, "cer": ot.evaluate(model, test_set), "weight_bytes": model.weight_bytes, **extra}
            rows.append(row)
            runtime_models.append(model)
            log(f"{scheme}: CER {row['cer']:.4f}")
            shown.advance(note=f"{scheme} done")
            return model

        checkpoint = workdir / f"fp32_h{hidden}_n{train_lines}_s{seed}.pt"
        teacher = ot.build(hidden, seed)
        if checkpoint.exists():
            teacher.load_state_dict(torch.load(checkpoint))
            log(f"fp32 model from {checkpoint}")
        else:
            log(f"training the fp32 BiLSTM({hidden}) for up to {train_seconds:.0f} s")
            ot.train(teacher, train_set, epochs=100, seconds=train_seconds, log=log)
            torch.save(teacher.state_dict(), checkpoint)
        teacher.eval()
        fp32 = add("fp32", teacher, hidden=hidden)
        add("bf16", bf16_weights(fp32), 16, 16, hidden=hidden)  # activations rounded to bf16 per product
        add("int8-ptq", quantize_dynamic(fp32), 8, 8, hidden=hidden)
        # the peer: the same model in ONNX Runtime, fp32 and with its dynamic int8 LSTM operator
        add("fp32-onnxruntime", use_onnxruntime(copy.deepcopy(fp32)), save=False, hidden=hidden, backend="onnxruntime")
        add("int8-ptq-onnxruntime", use_onnxruntime(copy.deepcopy(fp32), int8=True), 8, 8, save=False, hidden=hidden,
            backend="onnxruntime")

        # h sees c only through tanh, which is within 3e-4 of +-1 beyond |c| = 4.5: clipping c there costs the
        # output little, while a range set by the few integrating units (|c| ~ 70 here) would waste the grid.
        peak = ot.cell_peak(teacher, train_set)
        cell_limit = min(peak, 8.0)
        # every fine-tuned row trains finetune_seconds more: this row is the fp32 accuracy to compare them with
        add("fp32-finetuned", ot.train(copy.deepcopy(teacher), train_set, epochs=100, seconds=finetune_seconds,
                                       lr=1e-3, log=log), hidden=hidden, extra_train_s=finetune_seconds)
        log(f"cell-state clip for QAT: +-{cell_limit:.2f} (99.9th percentile of |c|: {peak:.1f})")
        for weight_bits, act_bits in qat:
            spec = QuantSpec(weight_bits, act_bits, cell_bits=8, cell_limit=cell_limit)
            module = ot.train(ot.with_spec(teacher, spec), train_set, epochs=100, seconds=finetune_seconds, lr=1e-3,
                              log=log)
            add(f"qat-w{weight_bits}a{act_bits}", module, weight_bits, act_bits, cell_bits=8, hidden=hidden,
                extra_train_s=finetune_seconds)

        for sparsity in sparsities:
            module = copy.deepcopy(teacher)
            masks = ot.magnitude_masks(module, sparsity)
            ot.apply_masks(module, masks)
            ot.train(module, train_set, epochs=100, seconds=finetune_seconds, lr=1e-3, log=log,
                     after_step=lambda m, masks=masks: ot.apply_masks(m, masks))
            add(f"prune-magnitude-{int(sparsity * 100)}", module, sparsity=sparsity, hidden=hidden,
                extra_train_s=finetune_seconds)

        for sparsity in block_sparsities:  # blocks of 16 output rows x 1 input, run by the block-sparse kernel
            module = copy.deepcopy(teacher)
            masks = ot.block_masks(module, sparsity)
            ot.apply_masks(module, masks)
            ot.train(module, train_set, epochs=100, seconds=finetune_seconds, lr=1e-3, log=log,
                     after_step=lambda m, masks=masks: ot.apply_masks(m, masks))
            add(f"prune-blocks-{int(sparsity * 100)}", ot.to_runtime(module, block_sparse=True), sparsity=sparsity,
                hidden=hidden, extra_train_s=finetune_seconds)

        half = ot.prune_hidden_units(teacher, hidden // 2)
        add("prune-units-half-no-finetune", half, sparsity=0.5, hidden=hidden // 2)
        ot.train(half, train_set, epochs=100, seconds=2 * finetune_seconds, lr=1e-3, log=log)  # it has more to relearn
        half = add("prune-units-half", half, sparsity=0.5, hidden=hidden // 2, extra_train_s=2 * finetune_seconds)
        add("prune-units-half-int8-onnxruntime", use_onnxruntime(copy.deepcopy(half), int8=True), 8, 8, sparsity=0.5,
            save=False, hidden=hidden // 2, backend="onnxruntime", extra_train_s=2 * finetune_seconds)

        for name, extra_loss in (("student", None), ("distilled", ot.distillation_loss(teacher))):
            student = ot.build(student_hidden, seed + 1)  # same start and same epochs, with and without teacher
            start = time.perf_counter()
            ot.train(student, train_set, epochs=student_epochs, log=log, extra_loss=extra_loss)
            add(f"{name}-bilstm{student_hidden}", student, hidden=student_hidden, train_s=time.perf_counter() - start)

        log(f"timing {len(runtime_models)} models on {len(timing_images)} lines, interleaved rounds")
        timings = time_models(runtime_models, timing_images)
        shown.advance(note="timed")
        for row, us in zip(rows, timings):
            row["us_per_line"], row["speedup"] = us, timings[0] / us  # against fp32 in our runtime
    print_table("OCR BiLSTM-CTC: accuracy vs speed (held-out lines, 1 thread, median)", rows,
                [("scheme", "scheme"), ("weight_bits", "W bits"), ("act_bits", "A bits"), ("sparsity", "sparsity"),
                 ("hidden", "hidden"), ("cer", "CER"), ("weight_bytes", "weight bytes"),
                 ("us_per_line", "us/line"), ("speedup", "speedup"), ("backend", "runs on"),
                 ("extra_train_s", "fine-tune s")],
                caption=f"{len(test_set.texts)} held-out lines; speed over {len(timing_images)} lines; training "
                        f"on 2 threads; students: {student_epochs} epochs from scratch")
    write_json(json_path, {"train_lines": train_lines, "test_lines": test_lines, "cell_limit": cell_limit,
                           "rows": rows})
    if plot_path or json_path:
        plot(rows, plot_path or Path(json_path).with_suffix(".png"))
    return rows


def pareto(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both CER and latency."""
    return [r for r in rows if not any(o["cer"] <= r["cer"] and o["us_per_line"] <= r["us_per_line"]
                                       and (o["cer"], o["us_per_line"]) != (r["cer"], r["us_per_line"])
                                       for o in rows)]


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    front = pareto(rows)
    for r in rows:
        ax.scatter(r["us_per_line"], 100 * r["cer"], color="tab:red" if r in front else "tab:gray")
        ax.annotate(r["scheme"], (r["us_per_line"], 100 * r["cer"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    front = sorted(front, key=lambda r: r["us_per_line"])
    ax.plot([r["us_per_line"] for r in front], [100 * r["cer"] for r in front], color="tab:red", lw=1)
    ax.set_xlabel("microseconds per line (1 thread)")
    ax.set_yscale("log")  # spans a failed row (~100%) down to a few percent
    ax.set_ylabel("character error rate (%, log scale)")
    ax.set_title("OCR BiLSTM-CTC compression: CER vs latency (red: Pareto front)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    console.print(f"plot: {path}")
