"""The building blocks of every config section (vae_scale/config.py and each model family's
section beside its network): strict pydantic models whose errors name the key."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Activation = Literal["relu", "leaky_relu", "silu"]


def _list_as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # YAML has no tuples


Beta = Annotated[float, Field(ge=0, lt=1)]
Betas = Annotated[tuple[Beta, Beta], BeforeValidator(_list_as_tuple)]  # Adam's (beta1, beta2)


class Section(BaseModel):
    """A config section: unknown keys, wrong types and non-finite numbers are errors."""

    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True
    )


class FieldError(ValueError):
    """A check across a section's fields that names the offending key (`field`, relative to
    the section, e.g. 'widths[1]')."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message
