"""Whether the optional real data sets are installed here, for the tests that need them to skip otherwise."""
from stn_ext import corpus
from stn_ext.data import fashion_mnist_folder


def fashion_mnist():
    """Fashion-MNIST's four IDX files (scripts/setup_env.sh installs Debian's dataset-fashion-mnist as root)."""
    try:
        fashion_mnist_folder()
        return True
    except FileNotFoundError:
        return False


def austen():
    """Jane Austen's novels and the rdata package that reads them (scripts/setup_env.sh fetches both)."""
    try:
        corpus.austen_folder()
        corpus._rdata()
        return True
    except (FileNotFoundError, ImportError):
        return False
