"""The base of the OpenAI wire objects: strict pydantic models in which ``null`` means a field's default."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class WireModel(BaseModel):
    """A strict wire object in which ``null`` means the field's default, at every level, as OpenAI's clients send
    it (``"logprobs": null``, ``"name": null`` in a message). Free-form values (a JSON schema) keep their nulls."""

    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data
