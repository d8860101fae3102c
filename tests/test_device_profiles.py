"""Device profiles ship as package data, parse strictly, and refuse what cannot fit before anything loads."""

import pytest

from edge_vl2.devices.profiles import available_devices, check_fit, load_device
from edge_vl2.errors import UserError

REQUIRED_DEVICES = {"cpu-kiosk", "rtx4060ti-16gb", "orin-nx-16gb", "orin-nano-8gb", "agx-orin-64gb"}


def test_the_shipped_profiles_load():
    assert REQUIRED_DEVICES <= set(available_devices())
    for name in available_devices():
        profile = load_device(name)
        assert profile.name == name and profile.memory_budget_gb > 0 and profile.bandwidth_gbs > 0
        assert profile.ort_providers[-1] == "CPUExecutionProvider"  # always a fallback


def test_roofline_uses_bandwidth():
    # model-facts §9: Tiny INT4 reads 0.297 GB per token; Orin NX (102.4 GB/s) -> ~345 tok/s upper bound
    assert load_device("orin-nx-16gb").decode_roofline_tok_s(0.297e9) == pytest.approx(344.8, rel=1e-3)


def test_fit_check_refuses_small_bf16_on_a_16gb_card():
    small_bf16, small_int4 = 32_296_699_008, 9_299_000_000  # model-facts §9.1/§9.2 bytes
    mla_cache_4k = 127_401_984
    with pytest.raises(UserError, match="rtx4060ti-16gb"):
        check_fit(load_device("rtx4060ti-16gb"), small_bf16, mla_cache_4k, "small bf16")
    assert check_fit(load_device("rtx4060ti-16gb"), small_int4, mla_cache_4k, "small int4") < 14.5
    with pytest.raises(UserError, match="orin-nano-8gb"):
        check_fit(load_device("orin-nano-8gb"), small_int4, mla_cache_4k, "small int4")


def test_unknown_device_and_bad_toml(tmp_path):
    with pytest.raises(UserError, match="unknown device"):
        load_device("toaster")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(UserError, match="TOML"):
        load_device(str(bad))
    partial = tmp_path / "partial.toml"
    partial.write_text('name = "x"\n')
    with pytest.raises(UserError, match="lacks"):
        load_device(str(partial))
