"""GenerationClient's own arguments, checked before anything is sent."""

import pytest

from deepseek_model_repository.client import GenerationClient


@pytest.mark.parametrize("seconds", [0, -1.0, float("nan")])
def test_a_client_timeout_that_is_not_a_positive_number_of_seconds_is_refused(seconds):
    with pytest.raises(ValueError, match="client_timeout_s .*more than 0, or None"):
        GenerationClient("127.0.0.1:1", "m", client_timeout_s=seconds)
