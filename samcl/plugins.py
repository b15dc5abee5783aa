"""The check that a configuration's method, learning module and backbone exist and fit each other.

Importing this module registers every method and learning module (it imports their
packages), so the configuration itself stays free of them.
"""
from . import learning_modules, methods  # noqa: F401  (they register the plug-ins)
from .config import Config, ConfigError
from .registry import METHODS, LEARNING_MODULES


def check_plugins(cfg: Config) -> Config:
    """The method and the learning module are registered and fit each other and the backbone;
    an unknown name or a combination that cannot work raises, naming the reason."""
    method, module = METHODS.get(cfg.method), LEARNING_MODULES.get(cfg.learning_module_kind)
    if method.learning_modules is not None and module.name not in method.learning_modules:
        raise ConfigError(f"method {method.name} works with the learning modules {list(method.learning_modules)}, "
                          f"not {module.name}")
    if module.backbones is not None and cfg.backbone not in module.backbones:
        raise ConfigError(f"learning module {module.name} needs the {' or '.join(module.backbones)} backbone, "
                          f"not {cfg.backbone}: {module.backbone_reason}")
    if cfg.prompt == "box" and module.needs_heatmap:
        raise ConfigError(f"prompt: box is CAD's recipe; the {module.name} module reads the point heatmap")
    return cfg
