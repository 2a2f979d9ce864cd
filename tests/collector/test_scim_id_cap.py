"""SCIM refuses a userName no request could name: past the cap on
principal ids (``policy.names.MAX_NAME_LENGTH``)."""

from __future__ import annotations

from kynara_sidecar.policy.names import MAX_NAME_LENGTH

from .test_scim import USER_SCHEMA, scim  # noqa: F401  (the fixture)


def test_a_user_name_past_the_principal_id_cap_is_a_400_naming_it(scim):  # noqa: F811
    too_long = "u" * (MAX_NAME_LENGTH + 1)

    status, _, body = scim.call(
        "POST", "/Users", {"schemas": [USER_SCHEMA], "userName": too_long}
    )
    at_cap, _, _ = scim.call(
        "POST", "/Users", {"schemas": [USER_SCHEMA], "userName": too_long[1:]}
    )

    assert status == 400, body
    assert body["scimType"] == "invalidValue"
    assert "userName" in body["detail"]
    assert f"1..{MAX_NAME_LENGTH} characters" in body["detail"]
    assert at_cap == 201
    assert scim.call("GET", "/Users")[2]["totalResults"] == 1
