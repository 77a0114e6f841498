"""Shim for transformers/tests/utils/test_configuration_utils.py: only non-composite configs use these kwargs,
and SpeederConfig is composite (a text_config sub-config), so ConfigTester never reads them."""

config_common_kwargs = {}
