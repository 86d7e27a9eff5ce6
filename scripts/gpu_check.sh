#!/usr/bin/env bash
# The prepared device check (developers only): the GPU tests, then the Cowley closed loop with
# the other session's twins as a third surrogate (configs/cowley2023_closed_loop_twins.yaml)
# on a whole session, which takes 6 to 10 hours on 2 CPU cores (docs/cowley2023.md).
#
# Made for this workplace's device tool (a bare GPU machine with its own python3 and torch,
# no internet, at most 10 minutes a command, files back only from $OUT). Two steps:
#
#   bash scripts/gpu_check.sh prepare     # here: wheels in .whl/, the data copied to .cowley/
#   device run: command "bash scripts/gpu_check.sh run", carry [".whl", ".cowley"], timeout_s 590
#
# `run` knows these variables: SESSION (default 201025), DEVICE (default cuda), BUDGET_S (the
# whole command's time, default 570 s, inside the device's 600), RUN_LIMIT_S (the closed loop's
# limit, default what the budget leaves after the tests, less 60 s for the redraw), CONFIG
# (default the twins config) and EXTRA (more `--set` arguments, e.g. a quick check on a CPU:
# DEVICE=cpu CONFIG=configs/cowley2023_closed_loop.yaml EXTRA="--set stimuli.sites=[201025_n000] --set synthesis.steps=4").
# What comes back under $OUT: gpu_check.log (everything printed), report.json, fit.json and
# run.log of the run, redraw.txt (`synth bench redraw`, 40 recordings).
# The data (GPL-3.0) travels in .cowley/, which .gitignore keeps out of the repository.
set -uo pipefail
cd "$(dirname "$0")/.."

wheels() {
    # kornia, synth's only dependency the device image lacks (torch, numpy, scipy, pyyaml,
    # tqdm, pillow and matplotlib are there). Not its Rust half kornia_rs (5.3 MB): with it the
    # data and the repository would outgrow the 64 MiB a call carries. kornia imports it only
    # for kornia.io, which synth does not use; `run` puts a stand-in there that says so.
    rm -rf .whl && mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "kornia==${KORNIA:-0.9.0}"
}

case "${1:-}" in
prepare)
    src=${DATA:-../shared/data/cowley2023_v4}
    [ -f "$src/README.md" ] || { echo "gpu_check: no Cowley data at $src (set DATA=DIR)" >&2; exit 1; }
    wheels || { echo "gpu_check: downloading the kornia wheel failed" >&2; exit 1; }
    rm -rf .cowley.tmp && cp -r "$src" .cowley.tmp && rm -rf .cowley && mv .cowley.tmp .cowley
    du -sh .whl .cowley
    echo "gpu_check: ready; the device call carries .whl and .cowley"
    ;;
run)
    : "${OUT:?gpu_check: run on the device machine, where OUT is set (or set OUT=DIR)}"
    SESSION=${SESSION:-201025}
    DEVICE=${DEVICE:-cuda}
    CONFIG=${CONFIG:-configs/cowley2023_closed_loop_twins.yaml}
    BUDGET_S=${BUDGET_S:-570}
    export PYTHONUNBUFFERED=1 SYNTH_NO_PROGRESS=1
    export SYNTH_CACHE_DIR=${SYNTH_CACHE_DIR:-/tmp/synth_cache}
    if [ -d .whl ]; then
        rm -rf /tmp/site
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
        if [ ! -d /tmp/site/kornia_rs ]; then  # the stand-in for kornia.io's import (see wheels above)
            mkdir -p /tmp/site/kornia_rs && : > /tmp/site/kornia_rs/__init__.py
            printf 'def __getattr__(name):\n    raise ImportError("kornia_rs is not installed here (scripts/gpu_check.sh): kornia.io cannot be used")\n' \
                > /tmp/site/kornia_rs/io.py
        fi
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    run=/tmp/gpu_check_run
    rm -rf "$run" "$run.partial"
    {
        date -u
        nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
        python3 -c "import torch, kornia; print('torch', torch.__version__, 'kornia', kornia.__version__, 'cuda', torch.cuda.is_available())"
        echo "== 1. GPU tests (pytest -m gpu)"
        if [ "$DEVICE" = cuda ]; then timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests; fi
        t0=$SECONDS
        limit=${RUN_LIMIT_S:-$((BUDGET_S - SECONDS - 60))}
        echo "== 2. $CONFIG on session $SESSION, device $DEVICE, limit ${limit} s"
        # synthesis.batch_size 64: one model call per batch of 64 images (four of 16 on a CPU);
        # the twins' activations take about 0.17 GB per image with 33 twins, 0.46 GB with 89.
        # shellcheck disable=SC2086
        timeout "$limit" python3 -m synth run "$CONFIG" --device "$DEVICE" \
            --set target.root=.cowley --set "target.session=$SESSION" --set synthesis.batch_size=64 \
            ${EXTRA:-} --out "$run"
        echo "run: exit $?, $((SECONDS - t0)) s"
        for f in report.json fit.json run.log; do
            [ -f "$run/$f" ] && cp "$run/$f" "$OUT/$f" || { [ -f "$run.partial/$f" ] && cp "$run.partial/$f" "$OUT/$f"; }
        done
        if [ -f "$run/report.json" ]; then
            echo "== 3. synth bench redraw (40 recordings)"
            timeout $((BUDGET_S - SECONDS > 10 ? BUDGET_S - SECONDS : 10)) python3 -m synth bench redraw "$run" --draws 40 --device "$DEVICE" | tee "$OUT/redraw.txt"
        fi
        date -u
    } 2>&1 | tee "$OUT/gpu_check.log"
    ;;
*)
    echo "usage: bash scripts/gpu_check.sh prepare|run" >&2
    exit 2
    ;;
esac
