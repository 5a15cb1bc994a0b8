"""python -m pyfast.benchmarks.memory: what it prints, and its byte counts' rules."""
import torch

from pyfast.benchmarks import memory


def test_report_prints_kept_bytes_for_pyfast_and_torchvision_models(capsys):
    # (no peaks: at this size parameter gradients, freed and made again in each step, outweigh the activations;
    # timing.cpu_peak_bytes and the lean step's peak are tested in test_bench_timing and tests/ops/test_lean.py)
    memory.main(["--models", "resnet18", "torchvision.resnet18", "--batch-size", "2", "--image-size", "32",
                 "--no-peak"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split()[:1] in (["resnet18"], ["torchvision.resnet18"])]
    assert [r[:2] for r in rows] == [["resnet18", "fp32"], ["resnet18", "bf16"], ["torchvision.resnet18", "fp32"],
                                     ["torchvision.resnet18", "bf16"]]
    for row in rows:
        ratio, not_lean = float(row[4]), float(row[5])  # (the MiB columns are rounded: small at this size)
        assert ratio < 0.6 and 0.95 < not_lean <= 1.0


def test_saved_tensors_counts_distinct_activation_storages():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(4, 4, requires_grad=True)
    with memory.SavedTensors(batch=3) as saved:
        h = x @ w  # saves x (3x4, an activation) and w (4x4, not)
        y = h.relu()  # saves its output
        y.view(-1).sum()
    assert saved.count == 2 and saved.bytes == x.nbytes + y.nbytes
