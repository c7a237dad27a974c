"""The training recipe: every setting that decides a training run, recorded in the manifest.

Each field carries its command-line help in its metadata, so ``bonewatch train`` builds its
options from this one declaration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bonewatch.models.architectures import BACKBONES, SMALL_CNN, weights_source

AUGMENTS = ("none", "flip", "full")


def _opt(default: Any, help: str, **limits: float) -> Any:
    """A recipe field with its ``bonewatch train`` help and optional ``min``/``max`` limits."""
    return field(default=default, metadata={"help": help, **limits})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (recorded in the manifest).

    Attributes:
        backbone: ``small_cnn`` or a ``keras.applications`` backbone (see ``BACKBONES``).
        input_size: Side of the square model input.
        epochs: Stage-1 (body part) epochs.
        fracture_epochs: Epochs of the fracture model shared by every part.
        part_epochs: Fine-tuning epochs of each part's fracture model.
        batch_size: Images per training step.
        learning_rate: Rate of training from scratch and of a pretrained model's frozen phase.
        patience: Epochs without a better validation score before a phase stops (the rate
            halves after half as many).
        seed: Seeds the patient split, weight initialisation, shuffling and augmentation.
        fractions: Train / validation / held-out test shares of the patients.
        confidence_floor: Stage-1 probability under which an image is unsupported.
        width: Filters of the small CNN's first block.
        augment: ``none``; ``flip``; or ``full``: flips, rotation, zoom and brightness.
        weights: Initial backbone weights: None (random), ``imagenet`` or a local file.
        freeze_epochs: With pretrained weights, the first epochs of stage 1 and of the shared
            fracture model train the head only, the backbone frozen.
        fine_tune_layers: Then the backbone's top N layers train too (-1: all of them).
        fine_tune_lr: Rate of everything that starts from learned weights: the fine-tuning
            phase and each part's model; ``learning_rate / 5`` when None.
        class_weights: Weigh classes inversely to their frequency in the loss.
        cache_gb: Largest disk cache of preprocessed images; a bigger set is read from its files
            every epoch (0: never cache).
    """

    backbone: str = _opt(
        SMALL_CNN,
        "small_cnn, densenet121, densenet169, resnet50, efficientnetb0 or mobilenetv3small.",
    )
    weights: str | None = _opt(
        None,
        "Initial backbone weights: none, imagenet (downloaded), or a local file saved from the "
        "same keras.applications model with include_top=False.",
    )
    input_size: int = _opt(128, "Model input side in pixels.")
    epochs: int = _opt(15, "Stage-1 epochs.")
    fracture_epochs: int = _opt(40, "Epochs of the fracture model shared by all parts.")
    part_epochs: int = _opt(10, "Fine-tuning epochs of each part's fracture model.")
    freeze_epochs: int = _opt(
        3, "Pretrained weights: first epochs with the backbone frozen.", min=0
    )
    fine_tune_layers: int = _opt(
        40, "Pretrained weights: top backbone layers fine-tuned next (-1: all)."
    )
    fine_tune_lr: float | None = _opt(
        None, "Rate of fine-tuning and of each part's model (default: learning rate / 5)."
    )
    learning_rate: float = _opt(2e-3, "Rate of training from scratch.")
    batch_size: int = _opt(32, "Images per step.", min=1)
    patience: int = _opt(8, "Epochs without a better validation score before stopping.", min=1)
    augment: str = _opt("flip", "none, flip, or full (flips, rotation, zoom, brightness).")
    class_weights: bool = _opt(True, "Weigh classes inversely to their frequency.")
    fractions: tuple[float, float, float] = _opt(
        (0.7, 0.15, 0.15), "Train,validation,test shares of the patients."
    )
    cache_gb: float = _opt(8.0, "Largest disk cache of preprocessed images (0: none).", min=0.0)
    seed: int = _opt(0, "Seed for splits, weights and shuffling.")
    confidence_floor: float = _opt(
        0.7, "Stage-1 probability below which = unsupported.", min=0.0, max=1.0
    )
    width: int = 16

    def __post_init__(self) -> None:
        # Configs come back from manifests as JSON: lists for tuples, "none" for no weights.
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        object.__setattr__(self, "weights", weights_source(self.weights))
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}"
            )
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
        if self.backbone == SMALL_CNN and self.weights is not None:
            raise ValueError("small_cnn has no pretrained weights; use --weights none")
        if min(self.epochs, self.fracture_epochs, self.batch_size) < 1 or self.part_epochs < 0:
            raise ValueError("epochs and batch size must be at least 1")
        if len(self.fractions) != 3:
            raise ValueError(f"fractions are train, validation, test; got {self.fractions}")

    @property
    def tune_rate(self) -> float:
        return self.fine_tune_lr if self.fine_tune_lr is not None else self.learning_rate / 5
