"""Property test: any malformed recipe or override gives exit code 2, a key path or file, and no traceback."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsk.recipe.schema import SECTIONS
from dsk.testing import isolated_plugin_manager, run_dsk

from . import toy_plugin

PM = isolated_plugin_manager(toy_plugin)
TRAINER_FIELDS = {"type", "steps", "lr", "rewards"}

identifiers = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
bad_scalars = st.one_of(
    st.text(alphabet="abcxyz", min_size=1, max_size=5),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(identifiers, st.integers(), min_size=1, max_size=2),
)


def base_recipe() -> dict:
    return {"trainer": {"type": "toy_trainer", "steps": 3, "lr": 0.1}, "data": {"type": "toy_task", "digits": 2}}


@st.composite
def mutation(draw):
    """One change that is guaranteed to make the recipe invalid, as (kind, payload)."""
    kind = draw(
        st.sampled_from(
            [
                "section",
                "option",
                "type_value",
                "range",
                "slot_name",
                "slot_scalar",
                "toml_syntax",
                "set_bad_path",
                "set_bad_value",
                "unset_missing",
                "extends_missing",
                "stage_unknown",
                "reward_bad",
            ]
        )
    )
    if kind == "section":
        name = draw(identifiers.filter(lambda n: n not in SECTIONS))
        return kind, {name: {"x": 1}}
    if kind == "option":
        return kind, draw(identifiers.filter(lambda n: n not in TRAINER_FIELDS))
    if kind in ("type_value", "set_bad_value"):
        return kind, draw(bad_scalars)
    if kind == "range":
        return kind, draw(st.integers(max_value=0))
    if kind == "slot_name":
        return kind, draw(identifiers.filter(lambda n: n not in {"toy_trainer"}))
    if kind == "slot_scalar":
        return kind, draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=2)))
    if kind == "toml_syntax":
        return kind, draw(st.sampled_from(["= = 1", "[unclosed", "key = ", "a = 'x", "x = [1,", "= 3", "[[t]\n"]))
    if kind in ("set_bad_path", "unset_missing"):
        return kind, draw(st.sampled_from(["a..b", ".x", "x.", "trainer..lr", "nope.nothing", "trainer.zzz.q"]))
    if kind == "extends_missing":
        return kind, draw(identifiers) + ".toml"
    if kind == "stage_unknown":
        return kind, draw(identifiers.filter(lambda n: n not in SECTIONS and n != "name"))
    return kind, draw(bad_scalars)


def apply(recipe: dict, mut, args: list[str], tmp: Path) -> str | None:
    kind, payload = mut
    if kind == "section":
        recipe.update(payload)
    elif kind == "option":
        recipe["trainer"][payload] = 1
    elif kind == "type_value":
        recipe["trainer"]["steps"] = payload
    elif kind == "range":
        recipe["trainer"]["steps"] = payload
    elif kind == "slot_name":
        recipe["trainer"]["type"] = payload
    elif kind == "slot_scalar":
        recipe["data"] = payload
    elif kind == "toml_syntax":
        return payload
    elif kind == "set_bad_path":
        args += (
            ["--set", f"{payload}=1"]
            if ".." in payload or payload.startswith(".") or payload.endswith(".")
            else ["--unset", payload]
        )
    elif kind == "set_bad_value":
        args += ["--set", f"trainer.steps={json.dumps(payload) if not isinstance(payload, str) else payload}"]
    elif kind == "unset_missing":
        args += ["--unset", payload]
    elif kind == "extends_missing":
        recipe.setdefault("dsk", {})["extends"] = payload
    elif kind == "stage_unknown":
        recipe.setdefault("stages", []).append({"name": f"s{len(recipe.get('stages', []))}", payload: {"x": 1}})
    elif kind == "reward_bad":
        recipe["trainer"].setdefault("rewards", {})["toy_reward"] = {"weight": payload}
    return None


@settings(max_examples=220, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutation(), min_size=1, max_size=3), st.booleans())
def test_malformed_recipes_exit_2_with_a_path_or_file_and_no_traceback(mutations, as_json):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recipe, args, extra_text = base_recipe(), [], None
        for mut in mutations:
            extra_text = apply(recipe, mut, args, tmp) or extra_text
        text = tomli_w.dumps(recipe)
        if extra_text:
            text += "\n" + extra_text + "\n"
        path = tmp / "recipe.toml"
        path.write_text(text)
        result = run_dsk(["recipe", "validate", str(path), *args] + (["--json"] if as_json else []), pm=PM)
        assert result.exit_code == 2, (text, args, result.output)
        assert result.exception is None, (text, args, result.exception)
        assert "Traceback" not in result.output
        if as_json:
            report = json.loads(result.stdout)
            assert report["problems"]
            for problem in report["problems"]:
                assert problem["path"] or ".toml" in problem["message"], problem
        else:
            assert "Error:" in result.stderr and ("." in result.stderr or ".toml" in result.stderr)
