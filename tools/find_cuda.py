"""Where the CUDA toolkit and pip's nvidia headers are; used by setup.py and CMakeLists.txt.

Run as a script, it prints the toolkit root (empty when none is found).
"""
import glob
import os
import shutil


def find_cuda_home():
    """The toolkit root (holding include/cuda_runtime.h), not the folder of an nvcc wrapper script."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # A wrapper script may exec the real nvcc: follow the exec line when there is one.
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            for word in head.split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(word)))
        except OSError:
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def pip_nvidia_dirs(sub):
    """Headers/libraries that pip's nvidia-* wheels install (cusparse.h and friends for torch 2.14)."""
    import site

    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(sp, "nvidia", "*", sub))
    return [d for d in dirs if os.path.isdir(d)]



if __name__ == "__main__":
    print(find_cuda_home() or "")
