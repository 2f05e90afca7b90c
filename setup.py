"""d2g_jax: Diffusion2GAN in JAX/Flax. See README.md."""

from setuptools import find_packages, setup

# Versions pinned to releases that install together on Python 3.11 (CPU wheels);
# on GPU/TPU install the matching jax[cuda12] / jax[tpu] wheel of the same version.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "safetensors==0.8.0",
    "transformers==5.23.0",  # tokenizers only: every network here is our own Flax code
    "grain==0.2.18",
    "array-record==0.8.6",
    "absl-py>=2.1",
    "numpy>=1.26",
    "tqdm>=4.66",
    "tensorboardX==2.6.5",   # TensorBoard event files without TensorFlow (training, evaluation)
    "pillow==12.3.0",        # PNG sample grids, image files, resizing references (< 13: Gradio's cap)
    "scipy==1.17.1",         # evaluation: the Frechet distance's matrix square root
]

# PyTorch is a reference and conversion tool, never the training runtime.
TORCH = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "diffusers==0.42.1",
]

# The digits demo (configs/demo.py): scikit-learn ships the 8x8 digits images; the
# teacher is written as a diffusers StableDiffusionPipeline and the result exported to one.
DEMO = TORCH + ["scikit-learn==1.9.1"]

# XLA's TPU compiler for ahead-of-time compiles on any host (benchmarks/train_compile.py);
# on TPU VMs it is also the runtime (jax[tpu] pins the same library). Never needed by the
# tests or the demo.
TPU = ["libtpu==0.0.42.*"]

# The web page (python -m d2g_jax.app): a student's images beside its teacher's.
APP = ["gradio==6.31.0"]

# Prompts from a tfds dataset prepared on disk (reading needs no TensorFlow).
TFDS = ["tensorflow-datasets==4.9.10"]

TEST = DEMO + TFDS + APP + [
    "pytest==9.2.0",
    "ruff==0.17.6",        # the linter (ruff.toml); CI runs `ruff check .` before the tests
    "elatentlpips==0.2",   # official E-LatentLPIPS, a test-only numerical reference
    "lpips==0.1.4",        # official pixel LPIPS, a test-only numerical reference
    "pywavelets==1.9.0",   # checks the sym6 filter constants of the augmentation resample
    "setuptools<81",       # elatentlpips imports pkg_resources
    "matplotlib>=3.8",
    "tensorboard==2.21.0",  # reads the event files back in tests (and views them)
    "pytorch-fid==0.3.0",  # FID Inception, a test-only numerical reference
    "clean-fid==0.1.35",   # FID resize / features / distance, a test-only numerical reference
    "requests==2.34.2",    # imported by clean-fid
    "playwright==1.65.2",  # drives Debian's Chromium in the web page's test (no `playwright install`)
]

setup(
    name="d2g_jax",
    version="0.1.0",
    description="Diffusion2GAN in JAX/Flax: distil Stable Diffusion into a one-step conditional GAN",
    packages=find_packages(include=["d2g_jax", "d2g_jax.*"]),
    package_data={"d2g_jax": ["presets/*.json"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={"torch": TORCH, "demo": DEMO, "tfds": TFDS, "tpu": TPU, "app": APP,
                    "test": TEST},
)
