#!/usr/bin/env bash
# Creates .venv (if missing), installs the dependencies and builds stn_ext into it (editable).
# CUDA kernels are built when torch has CUDA and a CUDA toolkit is found, or when FORCE_CUDA=1;
# FORCE_CUDA=0 builds the CPU kernels alone (seconds instead of minutes).
# A second run skips what has not changed: the dependencies while requirements.txt is the same, the
# build while the C++/CUDA sources, setup.py and the build settings are the same (stamps in .venv/); a
# changed source is rebuilt by ninja in build/ext-*, which recompiles only the files that changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate

stamp_of() { cat "$@" 2>/dev/null | sha256sum | cut -d' ' -f1; }

deps=$(stamp_of requirements.txt)
if [ "$(cat .venv/.stn_ext_deps 2>/dev/null)" = "$deps" ] && python -c "import torch" 2>/dev/null; then
  echo "dependencies up to date (requirements.txt unchanged)"
else
  python -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "is ignored" || true
  python -m pip install -q -r requirements.txt 2>&1 | grep -v "is ignored" || true
  python -c "import torch" # fail here, clearly, if torch did not install
  echo "$deps" > .venv/.stn_ext_deps
fi

# Fashion-MNIST (--data fashion-mnist, bench_tuning) from Debian's package; optional, nothing else needs it
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || [ -n "${STN_EXT_FASHION_MNIST:-}" ]; then
  :
elif [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist > /dev/null 2>&1 ||
     { apt-get update -q > /dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist > /dev/null 2>&1; }; then
    echo "installed Fashion-MNIST (Debian package dataset-fashion-mnist, /usr/share/datasets/fashion-mnist)"
  else
    echo "note: apt-get could not install dataset-fashion-mnist; --data fashion-mnist needs its IDX files (see README)"
  fi
else
  echo "note: Fashion-MNIST not installed (needs root and apt-get: apt-get install dataset-fashion-mnist, or set"
  echo "      STN_EXT_FASHION_MNIST to a folder of its IDX files); only --data fashion-mnist needs it"
fi

# Jane Austen's novels (the text corpus, stn_ext.corpus) from Debian's r-cran-janeaustenr, unpacked without R
# (installing it would pull in ~700 R packages), and PyPI's rdata that reads them (setup.py's "text" extra);
# optional, only the language-model corpus needs them
if ! python -c "import rdata" 2>/dev/null; then
  python -m pip install -q "rdata>=1.0" 2>&1 | grep -v "is ignored" || true
  python -c "import rdata" 2>/dev/null || echo "note: pip could not install rdata; the Austen corpus needs it (pip install rdata)"
fi
austen=${STN_EXT_AUSTEN:-${XDG_CACHE_HOME:-$HOME/.cache}/stn_ext/janeaustenr}
has_austen() { for d in "$1" "$1/data" "$1/usr/lib/R/site-library/janeaustenr/data"; do [ -f "$d/Rdata.rdb" ] && return 0; done; return 1; }
if has_austen "$austen" || has_austen /usr/lib/R/site-library/janeaustenr; then
  :
elif command -v apt-get > /dev/null && command -v dpkg-deb > /dev/null; then
  deb_dir=$(mktemp -d)
  if (cd "$deb_dir" && { apt-get download -q r-cran-janeaustenr > /dev/null 2>&1 ||
        { [ "$(id -u)" = 0 ] && apt-get update -q > /dev/null 2>&1 && apt-get download -q r-cran-janeaustenr > /dev/null 2>&1; }; }) &&
     mkdir -p "$austen" && dpkg-deb -x "$deb_dir"/r-cran-janeaustenr_*.deb "$austen"; then
    echo "fetched Jane Austen's novels (Debian package r-cran-janeaustenr, unpacked into $austen)"
  else
    echo "note: apt-get could not download r-cran-janeaustenr; the Austen corpus needs it (see docs/corpus.md)"
  fi
  rm -rf "$deb_dir"
else
  echo "note: Jane Austen's novels not fetched (needs apt-get and dpkg-deb: apt-get download r-cran-janeaustenr, then"
  echo "      dpkg-deb -x r-cran-janeaustenr_*.deb $austen); only the Austen text corpus needs them"
fi

export MAX_JOBS=${MAX_JOBS:-$(nproc)}
mode="${FORCE_CUDA:-auto}-${TORCH_CUDA_ARCH_LIST:-default}"
build=$(printf '%s\n' "$mode" | cat - setup.py $(find csrc -type f | LC_ALL=C sort) | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.stn_ext_build 2>/dev/null)" = "$build" ] && python -c "import stn_ext" 2>/dev/null; then
  echo "stn_ext up to date (sources and build settings unchanged since the last build: FORCE_CUDA=${FORCE_CUDA:-auto})"
elif [ -f .venv/.stn_ext_build ] && python -c "import stn_ext" 2>/dev/null; then
  echo "rebuilding stn_ext: its sources or build settings changed (FORCE_CUDA=${FORCE_CUDA:-auto}, MAX_JOBS=$MAX_JOBS; ninja recompiles only what changed) ..."
  mkdir -p build
  if ! python setup.py build_ext --inplace --build-temp "build/ext-$mode" > "build/ext-$mode.log" 2>&1; then
    tail -40 "build/ext-$mode.log"; echo "the build failed; its log: build/ext-$mode.log" >&2; exit 1
  fi
  echo "recompiled: $(grep -o -- '-o [^ ]*/csrc/[^ ]*\.o ' "build/ext-$mode.log" | sed 's|.*/csrc/|csrc/|; s|\.o $||' | tr '\n' ' ')(log: build/ext-$mode.log)"
  python -c "import stn_ext" && echo "$build" > .venv/.stn_ext_build
else
  echo "building stn_ext (FORCE_CUDA=${FORCE_CUDA:-auto}, MAX_JOBS=$MAX_JOBS) ..."
  python -m pip install -q --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
  python -c "import stn_ext" && echo "$build" > .venv/.stn_ext_build
fi
python - <<'PY'
import stn_ext, torch
if not stn_ext.has_cuda():
    print("stn_ext", stn_ext.__version__, "built with the CPU kernels only")
elif torch.cuda.is_available():
    print("stn_ext", stn_ext.__version__, "built with CUDA kernels;", torch.cuda.device_count(), "GPU(s) found")
else:
    print("stn_ext", stn_ext.__version__, "built with CUDA kernels, but no GPU was found: the CPU kernels run")
PY
