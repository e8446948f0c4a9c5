"""Task configs: defaults validate, unknown keys and bad combinations are refused with the value in the message."""

import pytest
from dsk_tasks.config import ArithmeticConfig, CountdownConfig, HFTokenizerConfig, ModularConfig
from pydantic import ValidationError


def test_defaults_validate_and_every_field_is_described():
    for config_class in (ArithmeticConfig, CountdownConfig, ModularConfig, HFTokenizerConfig):
        for name, field in config_class.model_fields.items():
            assert field.description, f"{config_class.__name__}.{name} has no description"
    assert ArithmeticConfig().answer_tag_required


def test_unknown_key_is_refused():
    with pytest.raises(ValidationError, match="digit"):
        ArithmeticConfig(digit=3)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"language_mix_rate": 0.2}, "at least two languages"),
        ({"languages": ["en", "en"]}, "once"),
        ({"languages": ["it"]}, "languages"),
        ({"format": "bare"}, "trace=false"),
        ({"format": "bare", "trace": False, "require_format": True}, "require_format"),
        ({"min_digits": 4, "max_digits": 2}, "min_digits=4"),
        ({"ops": ["-"]}, "ops"),
        ({"test_percent": 0}, "test_percent"),
    ],
)
def test_bad_arithmetic_options(options, message):
    with pytest.raises(ValidationError, match=message):
        ArithmeticConfig(**options)


def test_bare_format_does_not_require_tags():
    assert not ArithmeticConfig(format="bare", trace=False).answer_tag_required


def test_bad_countdown_numbers():
    with pytest.raises(ValidationError, match="min_numbers=5"):
        CountdownConfig(min_numbers=5, max_numbers=4)


def test_config_languages_match_the_word_tables():
    from typing import get_args

    from dsk_tasks.config import Language

    from dsk.data.languages import LANGUAGES

    assert set(get_args(Language)) == set(LANGUAGES)
