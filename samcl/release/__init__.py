"""The authors' released checkpoint format: safe loading, conversion, export.

A release folder (``checkpoint/SAM1`` or ``checkpoint/SAM2`` of the original code)
holds ``Module_Selector.pth`` (a plain selector state dict saved from CUDA) and one
``<domain>.pth`` per trained domain: a pickled dict of whole module *objects*
(``extra``: an instance of the authors' class ``module.SAMCL.Extra`` /
``module.SAMCL_2.Extra``; ``A``, ``B_000``.. as ``nn.Linear``; ``norm1_000``..,
``norm2_000``.. as ``nn.LayerNorm``; ``lora_layer``: the block indices).

Loading never runs the pickle with ``weights_only=False``. Every file is first
scanned statically (``pickletools``) for the globals it references, which must all
be on :data:`MODULE_GLOBALS` / :data:`SELECTOR_GLOBALS`; it is then read by torch's
own restricted unpickler (``torch.load(weights_only=True)``) with exactly those
classes made loadable through ``torch.serialization.safe_globals``. The authors'
``Extra`` class is registered under its qualified name with a local stand-in
(:class:`ReleaseExtra`, :class:`ReleaseExtra2`), so nothing of the authors' code is
needed or imported. Only tensors are read from the rebuilt objects; none of them is
ever called.

Command line::

    python -m samcl.release inspect checkpoint/SAM1
    python -m samcl.release convert checkpoint/SAM1 runs/release_sam1 --family sam
    python -m samcl.release export log_sam1/<run> exported/SAM1

``convert`` writes a run folder in this project's format (``run.json``, plain
state dicts); ``export`` writes a run folder in the release's layout, loadable by
the authors' code (``torch.load(..., weights_only=False)`` in their environment).

Modules: :mod:`.unpickle` (the restricted loading of the authors' pickles),
:mod:`.folder` (release files and folders mapped onto this project's modules and
selector; :func:`.folder.release_model` receives the model factory it builds
with; :func:`samcl.opening.open_run` opens a release folder as a run),
:mod:`.convert` (convert and export), ``__main__`` (the command line).
"""
from typing import Tuple

# the release's domain order (the selector's outputs) and its unseen, test-only domain
RELEASE_ORDER: Tuple[str, ...] = ("Kvasir", "camo", "ISTD", "ISIC", "cod", "COCO")
RELEASE_UNSEEN: Tuple[str, ...] = ("COCO",)
