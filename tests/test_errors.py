"""errors: the one formatter of pydantic validation errors."""

from pydantic import BaseModel, Field, ValidationError

from loradar_cli.errors import validation_message


class _Config(BaseModel):
    eps: float = Field(ge=0)
    steps: int


def test_validation_message_is_one_line_per_problem():
    try:
        _Config(eps=-1, steps="x")
    except ValidationError as err:
        every = validation_message(err)
        first = validation_message(err, first=True)
        quiet = validation_message(err, first=True, values=False)
    assert every.count("; ") == 1 and "\n" not in every
    assert first == "eps: Input should be greater than or equal to 0 (got -1)"
    assert quiet == "eps: Input should be greater than or equal to 0"
    assert every.endswith("steps: Input should be a valid integer, unable to parse string as an integer (got 'x')")
