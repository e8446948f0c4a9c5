"""An in-process test plugin: small components of several kinds with config models that exercise validation."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from dsk import hookimpl
from dsk.api import BaseConfig, Problem, ResolvedSlot, Slot, SlotField, SlotMap, SlotMapField


class ToyRouterConfig(BaseConfig):
    """Options of the toy router."""

    top_k: int = Field(2, ge=1, description="experts per token")
    score_func: Literal["sigmoid", "softmax"] = Field("sigmoid", description="affinity function")


class ToyMoEConfig(BaseConfig):
    n_experts: int = Field(8, ge=1, description="routed experts")
    router: Annotated[ResolvedSlot, Slot("router", "toy_router")] = SlotField("router", default="toy_router")

    @model_validator(mode="after")
    def _fits(self):
        if self.router.config.top_k > self.n_experts:
            raise ValueError(f"router.top_k = {self.router.config.top_k} exceeds n_experts = {self.n_experts}")
        return self


class ToyTrainerConfig(BaseConfig):
    steps: int = Field(10, ge=1, description="optimizer steps")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    rewards: Annotated[dict[str, ResolvedSlot], SlotMap("reward")] = SlotMapField("reward")


class ToyFeatureConfig(BaseConfig):
    block_size: int = Field(128, ge=1)


class ToyRewardConfig(BaseConfig):
    weight: float = Field(1.0)


class ToyTaskConfig(BaseConfig):
    digits: int = Field(2, ge=1, le=9)


def toy_reward(config, prompts, completions, **columns):
    return [config.weight for _ in completions]


@hookimpl
def register_model_components(register):
    register("router", "toy_router", ToyRouterConfig, config=ToyRouterConfig, summary="a toy router")
    register("ffn", "toy_moe", ToyMoEConfig, config=ToyMoEConfig, summary="a toy MoE")


@hookimpl
def register_trainers(register):
    register("trainer", "toy_trainer", ToyTrainerConfig, config=ToyTrainerConfig)


@hookimpl
def register_features(register):
    register("feature", "toy_feature", ToyFeatureConfig, config=ToyFeatureConfig)


@hookimpl
def register_rewards(register):
    register("reward", "toy_reward", toy_reward, config=ToyRewardConfig)
    register("reward", "other_reward", toy_reward, config=ToyRewardConfig)


@hookimpl
def register_tasks(register):
    register("task", "toy_task", ToyTaskConfig, config=ToyTaskConfig)


@hookimpl
def validate_recipe(recipe, resolved):
    trainer = resolved.get("trainer")
    feats = resolved.get("features") or {}
    if (
        trainer is not None
        and "toy_feature" in feats
        and trainer.config.steps < feats["toy_feature"].config.block_size // 128
    ):
        return [Problem("features.toy_feature.block_size", "block_size/128 must not exceed trainer.steps")]
    return None
