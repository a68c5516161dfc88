# bertops tasks. Run through `python3 bootstrap.py RECIPE`, which sets up .venv first,
# or directly with `just RECIPE` inside an activated .venv.

set shell := ["bash", "-euo", "pipefail", "-c"]

# list recipes
default:
    @just --list

# end to end on the bundled default (all-MiniLM-L6-v2): export -> predict -> serve -> query
demo out="runs/demo":
    bertops demo --out {{out}}

# the whole test suite (slow end-to-end tests included; perf_analyzer is installed first, once)
test *args:
    python bench/get_perf_analyzer.py > /dev/null
    python -m pytest -q {{args}}

# only the fast tests
test-fast *args:
    python -m pytest -q -m "not slow" {{args}}

# in-process inference benchmark (HF eager/SDPA vs onnxruntime vs bertops.infer)
bench-inference *args:
    python bench/inference.py {{args}}

# bf16 on the CPU: onnxruntime fp32/int8 vs OpenVINO fp32/bf16 vs PyTorch bf16 (needs AVX512-BF16 or AMX)
bench-bf16 *args:
    python bench/bf16_paths.py {{args}}

# Triton serving benchmark (perf_analyzer over concurrency)
bench-serving *args:
    python bench/get_perf_analyzer.py > /dev/null
    python bench/serving.py {{args}}

# soak: 60 s at concurrency 64, HTTP and gRPC, every answer checked against in-process
bench-soak *args:
    python bench/soak.py {{args}}
