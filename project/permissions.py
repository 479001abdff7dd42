"""One permission model for the admin and the API: Django's model permissions.

The admin asks `user.has_perm("<app_label>.<action>_<model>")` for each model
it shows; the API asks the same question through `has_model_permission`, so a
group, a user's own permissions and a superuser mean the same in both places
(docs/security.md "Who may do what"). `is_staff` only lets a user into the
admin; it grants nothing by itself.
"""

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

# Django's default permissions (Model._meta.default_permissions).
ACTIONS = ("view", "add", "change", "delete")


def permission_name(app_label: str, model: str, action: str) -> str:
    """The permission's full name as `has_perm` takes it, e.g. ``orders.change_order``.

    `model` is the model's lower-case name (``Model._meta.model_name``:
    ``cancelledorder``, ``productreport``); `action` one of ACTIONS.
    Raises ValueError for another action.
    """
    if action not in ACTIONS:
        raise ValueError(f"Unknown permission action {action!r}: one of {', '.join(ACTIONS)}.")
    return f"{app_label}.{action}_{model}"


def has_model_permission(user: AbstractBaseUser | AnonymousUser, app_label: str, model: str, action: str) -> bool:
    """Whether `user` may `action` ("view", "add", "change", "delete") rows of `app_label`.`model`.

    Django's `user.has_perm` (the auth backends: the user's own permissions,
    their groups', and everything for an active superuser; nothing for an
    inactive or anonymous user). "view" is also granted by "change", as the
    admin's ModelAdmin.has_view_permission grants it. Raises ValueError for
    an unknown action.
    """
    name = permission_name(app_label, model, action)  # a typo is an error for everyone, not a quiet "no"
    if not user.is_authenticated:
        return False
    if user.has_perm(name):
        return True
    return action == "view" and user.has_perm(permission_name(app_label, model, "change"))
