"""Orders' admin: orders are placed, cancelled and re-dispatched only through orders.services.

Each order a cancel or re-dispatch action touches gets an admin LogEntry
saying who did what and why; a cancelled order's history shows its order's.

"Add order" is a form of its own (a customer and product lines) handed to
`order_create`, so the admin starts the same saga as the API and never saves
an Order or OrderLine itself. Existing and cancelled orders are read-only;
nothing is deleted here (only the saga's compensation deletes an order).
Products come from inventory's public module, never from its models.
"""

import json
import logging
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.models import LogEntry
from django.contrib.admin.options import get_content_type_for_model
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import PAGE_VAR
from django.contrib.auth import get_permission_codename, get_user_model
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html, format_html_join
from kombu.exceptions import KombuError

from inventory import public as inventory
from project.admin import ReadOnlyAdmin, humanized_age
from project.http.errors import ApplicationError, Conflict
from reports import public as reports

from . import selectors, services
from .models import CancelledOrder, Order, OrderLine

logger = logging.getLogger(__name__)

LINES_PREFIX = "lines"
# Idempotency keys the admin's add form makes; the prefix keeps them apart from API clients' keys.
FORM_KEY_PREFIX = "admin-form-"


# --- small display helpers ---------------------------------------------------------


def _product_link(product_id: int) -> str:
    try:
        url = reverse("admin:inventory_product_change", args=[product_id])
    except NoReverseMatch:
        return str(product_id)
    return format_html('<a href="{}">{}</a>', url, product_id)


def _lines_table(lines: Any) -> str:
    """A cancelled order's lines JSON as a table (or as indented JSON if it is not the expected shape)."""
    if not isinstance(lines, list) or not all(isinstance(line, Mapping) for line in lines):
        return format_html("<pre>{}</pre>", json.dumps(lines, indent=2, ensure_ascii=False))
    rows = format_html_join(
        "",
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        (
            (line.get("product"), line.get("product_name", ""), line.get("unit_price", ""), line.get("quantity"))
            for line in lines
        ),
    )
    return format_html(
        "<table><thead><tr><th>Product</th><th>Name</th><th>Unit price</th><th>Quantity</th></tr></thead>"
        "<tbody>{}</tbody></table>",
        rows,
    )


# --- the add form ------------------------------------------------------------------


class OrderAddForm(forms.Form):
    user = forms.ModelChoiceField(
        queryset=None,
        label="Customer",
        help_text="The order is placed on this user's behalf and appears in their orders.",
    )
    # One key per rendered form: submitting the same page twice places one order.
    form_key = forms.CharField(widget=forms.HiddenInput, max_length=64)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        user_model = get_user_model()
        self.fields["user"].queryset = user_model.objects.filter(is_active=True).order_by(user_model.USERNAME_FIELD)


class OrderLineForm(forms.Form):
    product = forms.TypedChoiceField(coerce=int, empty_value=None, label="Product")
    quantity = forms.IntegerField(min_value=1, label="Quantity")

    def __init__(self, *args: Any, product_choices: list[tuple[Any, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["product"].choices = product_choices
        # Help for both columns is in the lines table's header (add_form.html), once for every row.
        self.fields["quantity"].widget.attrs.update(min=1, max=settings.ORDER_MAX_QUANTITY)


def product_choices() -> list[tuple[Any, str]]:
    """Active products for the line select, read through inventory's public module."""
    products = inventory.products_on_sale()
    return [("", "— choose a product —")] + [
        (p.id, f"{p.sku} — {p.name} ({p.price}, {p.stock} in stock)") for p in products
    ]


def line_formset(data: Mapping | None, choices: list[tuple[Any, str]]) -> forms.BaseFormSet:
    formset_class = forms.formset_factory(OrderLineForm, extra=3, max_num=settings.ORDER_MAX_LINES)
    return formset_class(data, prefix=LINES_PREFIX, form_kwargs={"product_choices": choices})


def show_service_errors(exc: ApplicationError, form: forms.Form, lines: list[forms.Form]) -> None:
    """Put order_create's field errors (``{"lines": {"<index>": {"product": [...]}}}``) on the forms they concern."""
    fields = dict(exc.fields or {})
    line_errors = fields.pop("lines", None)
    if isinstance(line_errors, Mapping):
        for index, errors in line_errors.items():
            target = lines[int(index)] if str(index).isdigit() and int(index) < len(lines) else form
            if not isinstance(errors, Mapping):
                errors = {None: errors}
            for field, msgs in errors.items():
                target.add_error(field if field in target.fields else None, msgs)
    elif line_errors:
        form.add_error(None, line_errors)
    for msgs in fields.values():
        form.add_error(None, msgs)
    if not exc.fields:
        form.add_error(None, exc.message)


# --- orders --------------------------------------------------------------------------


class OrderLineInline(admin.TabularInline):
    model = OrderLine
    fields = ("product", "product_name", "unit_price", "quantity", "line_total")
    readonly_fields = fields
    extra = 0
    max_num = 0
    can_delete = False

    def has_view_permission(self, request, obj=None) -> bool:
        # Lines are part of the order: whoever may see the order sees its lines.
        opts = Order._meta
        return request.user.has_perm(f"{opts.app_label}.{get_permission_codename('view', opts)}") or (
            request.user.has_perm(f"{opts.app_label}.{get_permission_codename('change', opts)}")
        )

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="product")
    def product(self, line: OrderLine) -> str:
        return _product_link(line.product_id)

    @admin.display(description="line total")
    def line_total(self, line: OrderLine) -> Decimal:
        return line.unit_price * line.quantity


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    """Orders are read-only here; "Add order" and the actions call orders.services."""

    add_form_template = "admin/orders/order/add_form.html"
    cancel_confirmation_template = "admin/orders/order/cancel_confirmation.html"
    list_display = ("id", "user", "status", "age", "lines_summary", "dispatch_attempts", "last_dispatched_at")
    list_filter = ("status",)
    list_select_related = ("user",)
    search_fields = ("id__exact", "user__username")
    search_help_text = "Order id (exact) or username."
    ordering = ("-id",)
    inlines = (OrderLineInline,)
    actions = ("cancel_orders", "redispatch_orders")
    fieldsets = (
        (None, {"fields": ("id", "user", "status", "age", "created_at", "confirmed_at", "total")}),
        (
            "Saga",
            {"fields": ("dispatch_attempts", "last_dispatched_at", "updated_at", "stock_held", "reasons")},
        ),
        ("Idempotency", {"classes": ("collapse",), "fields": ("idempotency_key", "request_fingerprint")}),
    )
    readonly_fields = (
        "id", "user", "status", "age", "created_at", "confirmed_at", "total", "dispatch_attempts",
        "last_dispatched_at", "updated_at", "stock_held", "reasons", "idempotency_key", "request_fingerprint",
    )  # fmt: skip

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("lines")

    # --- permissions ---------------------------------------------------------------

    def _has_model_perm(self, request, action: str) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.{get_permission_codename(action, self.opts)}")

    def has_change_permission(self, request, obj=None) -> bool:
        # An order changes only through the saga and the actions: the change view is a read-only view.
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        # Only compensation deletes an order (keeping a CancelledOrder record); use "Cancel".
        return False

    def has_cancel_permission(self, request) -> bool:
        return self._has_model_perm(request, "change")

    def has_redispatch_permission(self, request) -> bool:
        return self._has_model_perm(request, "change")

    # --- list and detail ---------------------------------------------------------------

    @admin.display(description="age", ordering="-created_at")
    def age(self, order: Order) -> str:
        return humanized_age(order.created_at)

    @admin.display(description="lines")
    def lines_summary(self, order: Order) -> str:
        lines = list(order.lines.all())
        summary = ", ".join(f"{line.quantity} × {line.product_name}" for line in lines[:3])
        if len(lines) > 3:
            summary += f", +{len(lines) - 3} more"
        return summary

    @admin.display(description="total")
    def total(self, order: Order) -> Decimal:
        return sum((line.unit_price * line.quantity for line in order.lines.all()), Decimal("0"))

    @admin.display(description="stock held by inventory")
    def stock_held(self, order: Order) -> str:
        held = inventory.active_units_by_order([order.pk]).get(order.pk, {})
        if not held:
            return "none"
        return format_html_join(", ", "{} × product {}", ((units, _product_link(pid)) for pid, units in held.items()))

    @admin.display(description="reasons")
    def reasons(self, order: Order) -> str:
        """Why the order is being cancelled or a step failed, from every service that recorded one."""
        found = [
            ("cancel requested", order.cancel_reason),
            ("orders", order.failure_reason),
            ("inventory", inventory.order_failure_reason(order.pk)),
            ("reports", reports.order_failure_reason(order.pk)),
        ]
        found = [(source, reason) for source, reason in found if reason]
        if not found:
            return "none recorded"
        return format_html("<ul>{}</ul>", format_html_join("", "<li>{}: {}</li>", found))

    def change_view(self, request, object_id, form_url="", extra_context=None):
        # An order the saga deleted: show its cancelled record rather than "doesn't exist".
        order_id = unquote(object_id)
        if order_id.isdigit():
            found = selectors.order_or_cancelled(user=request.user, order_id=int(order_id))
            cancelled_admin = self.admin_site._registry.get(CancelledOrder)
            if isinstance(found, CancelledOrder) and cancelled_admin and cancelled_admin.has_view_permission(request):
                self.message_user(request, f"Order {order_id} was cancelled: {found.reason}", messages.INFO)
                url = reverse("admin:orders_cancelledorder_change", args=[found.pk], current_app=self.admin_site.name)
                return HttpResponseRedirect(url)
        return super().change_view(request, object_id, form_url, extra_context)

    # --- add: order_create, nothing else -------------------------------------------------

    def add_view(self, request, form_url="", extra_context=None):
        if not self.has_add_permission(request):
            raise PermissionDenied
        choices = product_choices()
        if request.method == "POST":
            form = OrderAddForm(request.POST)
            lines = line_formset(request.POST, choices)
            if all([form.is_valid(), lines.is_valid()]):  # both, so every error shows at once
                response = self._place_order(request, form, lines)
                if response is not None:
                    return response
        else:
            form = OrderAddForm(initial={"user": request.user.pk, "form_key": FORM_KEY_PREFIX + uuid.uuid4().hex})
            lines = line_formset(None, choices)
        return self._render_add_form(request, form, lines, form_url, extra_context)

    def _place_order(self, request, form: OrderAddForm, lines: forms.BaseFormSet) -> HttpResponseRedirect | None:
        """Hand the lines to order_create; on refusal put its reasons on the forms and return None."""
        filled = [line for line in lines.forms if line.cleaned_data]
        try:
            placed = services.order_create(
                user=form.cleaned_data["user"],
                lines=[
                    {"product": line.cleaned_data["product"], "quantity": line.cleaned_data["quantity"]}
                    for line in filled
                ],
                idempotency_key=form.cleaned_data["form_key"],
            )
        except Conflict:
            form.add_error(
                None,
                "This form was already used to place an order with other lines. "
                "Open “Add order” again to place another order.",
            )
            return None
        except ApplicationError as exc:
            show_service_errors(exc, form, filled)
            return None

        if placed.cancelled is not None:
            # This same form was submitted before, and that order has since been cancelled.
            self.message_user(
                request,
                f"This form already placed order {placed.cancelled.pk}, since cancelled: {placed.cancelled.reason}",
                messages.WARNING,
            )
            url = reverse("admin:orders_cancelledorder_change", args=[placed.cancelled.pk])
            return HttpResponseRedirect(url)
        order = placed.order
        if placed.created:
            self.log_addition(request, order, [{"added": {}}])
            self.message_user(
                request,
                f"Order {order.pk} placed for {order.user}. It stays pending while inventory reserves the stock "
                "and reports records the sale, then becomes confirmed, or is cancelled with a reason.",
                messages.SUCCESS,
            )
        else:
            self.message_user(
                request,
                f"This form was already submitted: it placed order {order.pk} (not placed twice).",
                messages.WARNING,
            )
        url = reverse(
            f"admin:{self.opts.app_label}_{self.opts.model_name}_change",
            args=[order.pk],
            current_app=self.admin_site.name,
        )
        return HttpResponseRedirect(url)

    def _render_add_form(self, request, form, lines, form_url, extra_context) -> TemplateResponse:
        adminform = helpers.AdminForm(form, [(None, {"fields": ["user", "form_key"]})], {}, model_admin=self)
        inline_data = {
            "name": f"#{LINES_PREFIX}",
            "options": {"prefix": LINES_PREFIX, "addText": "Add another line", "deleteText": "Remove"},
        }
        context = {
            **self.admin_site.each_context(request),
            "title": "Add order",
            "subtitle": None,
            "opts": self.opts,
            "app_label": self.opts.app_label,
            "adminform": adminform,
            "formset": lines,
            "formset_data": json.dumps(inline_data),
            "errors": helpers.AdminErrorList(form, [lines]),
            "media": self.media + adminform.media + lines.media + forms.Media(js=["admin/js/inlines.js"]),
            "add": True,
            "change": False,
            "is_popup": False,
            "save_as": False,
            "has_view_permission": self.has_view_permission(request),
            "has_add_permission": True,
            "has_change_permission": False,
            "has_delete_permission": False,
            "form_url": form_url,
            "max_lines": settings.ORDER_MAX_LINES,
            "max_quantity": settings.ORDER_MAX_QUANTITY,
            "no_products": len(lines.empty_form.fields["product"].choices) <= 1,
            **(extra_context or {}),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, self.add_form_template, context)

    # --- actions ---------------------------------------------------------------------

    @admin.action(description="Cancel selected orders", permissions=["cancel"])
    def cancel_orders(self, request, queryset):
        orders = list(queryset)
        if request.POST.get("post") != "yes":
            context = {
                **self.admin_site.each_context(request),
                "title": "Cancel orders?",
                "subtitle": None,
                "opts": self.opts,
                "orders": orders,
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
                "media": self.media,
            }
            request.current_app = self.admin_site.name
            return TemplateResponse(request, self.cancel_confirmation_template, context)

        started, gone, unpublished = [], [], []
        for order in orders:
            reason = services.cancel_reason_for(order=order, actor=request.user, in_admin=True)
            try:
                if services.order_cancel(order=order, actor=request.user, in_admin=True):
                    started.append(order.pk)
                    self.log_change(request, order, f"Cancel: compensation started ({reason}).")
                else:
                    gone.append(order.pk)
                    self.log_change(request, order, "Cancel asked: the order was already gone (see Cancelled orders).")
            except (KombuError, OSError) as exc:
                # The order is committed `cancelling`; the sweeper publishes its compensation again.
                logger.warning("order %s: cancel recorded but compensation not published: %s", order.pk, exc)
                unpublished.append(order.pk)
                self.log_change(
                    request, order, f"Cancel: marked cancelling ({reason}); the broker could not be reached."
                )
        if started:
            self.message_user(
                request,
                f"Cancelling {len(started)} order(s): {_ids(started)}. Stock is released, the sale reverted, "
                "and each order then moves to Cancelled orders with its reason.",
                messages.SUCCESS,
            )
        if gone:
            self.message_user(request, f"Already gone (see Cancelled orders): {_ids(gone)}.", messages.WARNING)
        if unpublished:
            self.message_user(
                request,
                f"Marked cancelling but the broker could not be reached: {_ids(unpublished)}. "
                "The saga sweeper will publish their compensation again.",
                messages.ERROR,
            )
        return None

    @admin.action(description="Re-dispatch selected pending orders", permissions=["redispatch"])
    def redispatch_orders(self, request, queryset) -> None:
        orders = list(queryset)
        sent, skipped = [], []
        for order in orders:
            if services.order_redispatch(order_id=order.pk):
                sent.append(order.pk)
                self.log_change(request, order, "Re-dispatch: the saga was published again.")
            else:
                skipped.append(order.pk)
                self.log_change(request, order, "Re-dispatch skipped: the order is not pending.")
        skipped.sort()
        if sent:
            self.message_user(
                request, f"Re-dispatched the saga of {len(sent)} order(s): {_ids(sent)}.", messages.SUCCESS
            )
        if skipped:
            self.message_user(request, f"Skipped, not pending: {_ids(skipped)}.", messages.WARNING)


def _ids(order_ids: list[int]) -> str:
    return ", ".join(str(order_id) for order_id in order_ids)


# --- read-only records -------------------------------------------------------------------


@admin.register(CancelledOrder)
class CancelledOrderAdmin(ReadOnlyAdmin):
    list_display = ("order_id", "username", "cause", "short_reason", "status_before", "created_at", "cancelled_at")
    list_filter = ("cause", "status_before")
    search_fields = ("order_id__exact", "username", "reason")
    search_help_text = "Order id (exact), username, or words of the reason."
    ordering = ("-cancelled_at",)
    fieldsets = (
        (None, {"fields": ("order_id", "user", "username", "reason", "cause", "status_before")}),
        ("Lines", {"fields": ("lines_table", "total")}),
        ("Saga", {"fields": ("dispatch_attempts", "created_at", "cancelled_at")}),
        ("Raw", {"classes": ("collapse",), "fields": ("lines_json", "idempotency_key", "request_fingerprint")}),
    )
    readonly_fields = (
        "order_id", "user", "username", "reason", "cause", "status_before", "lines_table", "total", "dispatch_attempts",
        "created_at", "cancelled_at", "lines_json", "idempotency_key", "request_fingerprint",
    )  # fmt: skip

    def history_view(self, request, object_id, extra_context=None):
        """The record's history with the order's: the admin's cancel is logged on the Order, deleted since."""
        response = super().history_view(request, object_id, extra_context)
        if not isinstance(response, TemplateResponse):
            return response  # no such record: Django's redirect
        entries = (
            LogEntry.objects.filter(
                object_id=unquote(object_id),
                content_type__in=[get_content_type_for_model(Order), get_content_type_for_model(CancelledOrder)],
            )
            .select_related()
            .order_by("action_time")
        )
        paginator = self.get_paginator(request, entries, 100)
        page = paginator.get_page(request.GET.get(PAGE_VAR, 1))
        response.context_data.update(
            action_list=page,
            page_range=paginator.get_elided_page_range(page.number),
            pagination_required=paginator.count > 100,
        )
        return response

    @admin.display(description="reason", ordering="reason")
    def short_reason(self, cancelled: CancelledOrder) -> str:
        reason = cancelled.reason
        return reason if len(reason) <= 100 else reason[:99] + "…"

    @admin.display(description="lines")
    def lines_table(self, cancelled: CancelledOrder) -> str:
        return _lines_table(cancelled.lines)

    @admin.display(description="lines (JSON)")
    def lines_json(self, cancelled: CancelledOrder) -> str:
        return format_html("<pre>{}</pre>", json.dumps(cancelled.lines, indent=2, ensure_ascii=False))

    @admin.display(description="total")
    def total(self, cancelled: CancelledOrder) -> str:
        try:
            amount = sum(Decimal(str(line["unit_price"])) * int(line["quantity"]) for line in cancelled.lines)
        except (ArithmeticError, KeyError, TypeError, ValueError):
            return "—"
        return str(amount)
