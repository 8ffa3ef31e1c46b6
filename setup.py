from setuptools import find_packages, setup


def _version() -> str:
    ns: dict = {}
    with open("nfdet/__init__.py") as f:
        for line in f:
            if line.startswith("__version__"):
                exec(line, ns)
    return ns["__version__"]


setup(
    name="nfdet",
    version=_version(),
    description="Normalizer-Free Networks (NFNets) for detectron2 object detection",
    packages=find_packages(include=["nfdet", "nfdet.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "numpy",
        "pillow",
        "opencv-python",
        "pycocotools",
        "fvcore",
        "iopath",
        "tqdm",
        "webdataset==1.0.2",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        # Reading DeepMind's released *.npz files (dill pickles) needs dill.
        "deepmind": ["dill"],
        "test": ["pytest", "hypothesis==6.170.15", "timm==1.0.31", "dill", "ruff==0.17.6"],
    },
)
