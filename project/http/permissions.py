"""DRF permission classes over Django's model permissions (project.permissions).

Like DRF's DjangoModelPermissions (a method maps to an action: POST to "add",
PUT and PATCH to "change", DELETE to "delete"), but the model is named on the
class rather than read from a queryset, and reads may be open to every
signed-in user where the endpoint itself shows each user only what is theirs
or what is public to customers (products).
"""

from rest_framework import exceptions
from rest_framework.permissions import BasePermission

from project.permissions import has_model_permission

# Method -> the model permission's action; None: any signed-in user.
WRITES = {"POST": "add", "PUT": "change", "PATCH": "change", "DELETE": "delete"}
READS = ("GET", "HEAD")


class ModelPermissions(BasePermission):
    """Signed in, and holding `<app_label>.<action>_<model>` for the request's method.

    Subclasses set `app_label` and `model` (``Model._meta.model_name``), and
    `reads_need_permission`: True asks "view" for GET and HEAD (also granted
    by "change", as in the admin); False lets every signed-in user read.
    OPTIONS needs only a signed-in user. Another method is a 405 (DRF's
    MethodNotAllowed), after the sign-in check. A method the view does not
    have is checked like the others first, so a user without the permission
    gets 403 before learning it is a 405 (DRF's order: permissions, then
    the handler).

    Without a signed-in user DRF answers 401 (`not_authenticated`), whatever
    the method.
    """

    app_label: str = ""
    model: str = ""
    reads_need_permission: bool = True
    message = "You do not have permission to perform this action."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        method = request.method
        if method in READS:
            action = "view" if self.reads_need_permission else None
        elif method == "OPTIONS":
            action = None
        elif method in WRITES:
            action = WRITES[method]
        else:
            raise exceptions.MethodNotAllowed(method)
        if action is None:
            return True
        if has_model_permission(user, self.app_label, self.model, action):
            return True
        self.message = f"This needs the permission {self.app_label}.{action}_{self.model}."
        return False
