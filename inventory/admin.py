"""Inventory's admin: products and their stock, managed only through inventory.services.

Adding a product calls `product_create`; changing one calls `product_update`
(sku, name, price, active) and `stock_adjust` (a signed delta applied to the
current stock, never a blind overwrite). Nothing is deleted here: reservations
refer to products, so a product is deactivated instead. Reservations are
written by the saga alone and are shown read-only.
"""

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db.models import Sum
from django.urls import reverse
from django.utils.html import format_html

from project.admin import ReadOnlyAdmin
from project.http.errors import ApplicationError

from . import selectors, services
from .exceptions import StockRefused
from .models import STOCK_MAX, OrderReservation, Product, StockReservation

# What product_update may change; stock goes through stock_adjust.
EDITABLE_FIELDS = ("sku", "name", "price", "active")

FormErrors = dict[str | None, list[str]]


class ServiceRefused(Exception):
    """A service refused a save the form had accepted; `errors` maps form fields (None: the form) to messages."""

    def __init__(self, errors: FormErrors) -> None:
        super().__init__(errors)
        self.errors = errors


def _form_errors(exc: ApplicationError | ValidationError) -> FormErrors:
    if isinstance(exc, ValidationError):
        if hasattr(exc, "error_dict"):
            return {None if field == NON_FIELD_ERRORS else field: msgs for field, msgs in exc.message_dict.items()}
        return {None: exc.messages}
    errors: FormErrors = {}
    for field, msgs in (exc.fields or {}).items():
        errors[field] = [str(m) for m in msgs] if isinstance(msgs, list) else [str(msgs)]
    return errors or {None: [exc.message]}


class _ServiceForm(forms.ModelForm):
    """A product form that can show what the service said when this same POST was last saved."""

    # Set per request by ProductAdmin.get_form on the retry after a refusal.
    service_errors: FormErrors = {}

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        for field, msgs in self.service_errors.items():
            self.add_error(field if field in self.fields else None, msgs)
        return cleaned


class ProductAddForm(_ServiceForm):
    class Meta:
        model = Product
        fields = ("sku", "name", "price", "stock", "active")
        labels = {"stock": "Initial stock"}
        help_texts = {
            "sku": "Unique stock-keeping unit, e.g. WIDGET-RED-M.",
            "price": "Unit price; orders keep the price the product had when they were placed.",
            "stock": "Units on hand now. Later changes are made as additions or removals.",
            "active": "Only active products can be ordered.",
        }


class ProductChangeForm(_ServiceForm):
    stock_delta = forms.IntegerField(
        label="Add/remove stock",
        required=False,
        initial=0,
        # The API's bounds (inventory.serializers); the sum is stock_adjust's to check.
        min_value=-STOCK_MAX,
        max_value=STOCK_MAX,
        help_text=(
            "Units to add to the current stock (e.g. 10), or to remove from it with a minus sign (e.g. -3). "
            "Applied to the stock as it is when you save, so concurrent orders are not overwritten; "
            f"stock can never go below zero, nor above {STOCK_MAX} units with those held by orders."
        ),
    )

    class Meta:
        model = Product
        fields = ("sku", "name", "price", "active")
        help_texts = {
            **ProductAddForm.Meta.help_texts,
            "stock": "Units on hand now; change them with “Add/remove stock”.",
        }


def _copy_state(source: Product, target: Product) -> None:
    """Give the admin's unsaved instance the state the service saved (for its log and redirect)."""
    for field in Product._meta.concrete_fields:
        setattr(target, field.attname, getattr(source, field.attname))
    target._state.adding = False
    target._state.db = source._state.db


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    form = ProductChangeForm
    add_form = ProductAddForm
    list_display = ("sku", "name", "price", "stock", "active", "updated_at")
    list_display_links = ("sku", "name")
    list_filter = ("active",)
    search_fields = ("sku", "name")
    ordering = ("sku",)
    actions = ("deactivate_products", "activate_products")
    add_fieldsets = ((None, {"fields": ("sku", "name", "price", "stock", "active")}),)
    fieldsets = (
        (None, {"fields": ("sku", "name", "price", "active")}),
        ("Stock", {"fields": ("stock", "stock_delta", "reserved_units")}),
        ("History", {"fields": ("version", "created_at", "updated_at")}),
    )
    readonly_fields = ("stock", "reserved_units", "version", "created_at", "updated_at")

    # --- permissions -------------------------------------------------------

    def has_delete_permission(self, request, obj=None) -> bool:
        # Reservations refer to products: deactivate instead.
        return False

    # --- forms -------------------------------------------------------------

    def get_fieldsets(self, request, obj=None):
        return self.add_fieldsets if obj is None else super().get_fieldsets(request, obj)

    def get_readonly_fields(self, request, obj=None):
        # On add, `stock` is the editable initial stock.
        return () if obj is None else super().get_readonly_fields(request, obj)

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = self.add_form
        form = super().get_form(request, obj, change=change, **kwargs)
        errors = getattr(request, "_service_errors", None)
        if errors:
            form = type(form.__name__, (form,), {"service_errors": errors})
        return form

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except ServiceRefused as refused:
            # The admin's transaction rolled back: nothing was written. Validate
            # the same POST again, now carrying the service's reasons as form
            # errors, so the page comes back with the user's input and why.
            request._service_errors = refused.errors
            return super().changeform_view(request, object_id, form_url, extra_context)

    # --- writes: services only ------------------------------------------------

    def save_model(self, request, obj, form, change) -> None:
        """Write through the services instead of obj.save()."""
        try:
            if change:
                product = self._change(obj.pk, form)
            else:
                product = services.product_create(**{f: form.cleaned_data[f] for f in ProductAddForm.Meta.fields})
        except (ApplicationError, ValidationError) as exc:
            raise ServiceRefused(_form_errors(exc)) from exc
        _copy_state(product, obj)

    def _change(self, product_id: int, form: forms.ModelForm) -> Product:
        changes = {f: form.cleaned_data[f] for f in EDITABLE_FIELDS if f in form.changed_data}
        if changes:
            services.product_update(product_id=product_id, **changes)
        delta = form.cleaned_data.get("stock_delta") or 0
        if delta:
            try:
                services.stock_adjust(product_id=product_id, delta=delta)
            except StockRefused as exc:
                have = selectors.product_get(product_id=product_id).stock
                message = f"Cannot remove {-delta} units: only {have} in stock."
                raise ServiceRefused({"stock_delta": [message]}) from exc
        return selectors.product_get(product_id=product_id)

    def save_related(self, request, form, formsets, change) -> None:
        # Products have no inlines or many-to-many fields: nothing else to save,
        # and the default (form.save_m2m, formset.save) must not write behind the services.
        pass

    # --- display ---------------------------------------------------------------

    @admin.display(description="units held by active reservations")
    def reserved_units(self, product: Product) -> str:
        held = product.reservations.filter(released_at=None).aggregate(units=Sum("quantity"))["units"] or 0
        url = reverse("admin:inventory_stockreservation_changelist") + f"?product__id__exact={product.pk}"
        return format_html('{} (<a href="{}">reservations</a>)', held, url)

    # --- actions ---------------------------------------------------------------

    def _set_active(self, request, queryset, active: bool) -> None:
        ids = list(queryset.exclude(active=active).values_list("pk", flat=True))
        for product_id in ids:
            services.product_update(product_id=product_id, active=active)
        state = "active" if active else "inactive"
        self.message_user(request, f"{len(ids)} product(s) marked {state}.", messages.SUCCESS)

    @admin.action(description="Deactivate selected products (stop selling them)", permissions=["change"])
    def deactivate_products(self, request, queryset) -> None:
        self._set_active(request, queryset, False)

    @admin.action(description="Activate selected products", permissions=["change"])
    def activate_products(self, request, queryset) -> None:
        self._set_active(request, queryset, True)


@admin.register(OrderReservation)
class OrderReservationAdmin(ReadOnlyAdmin):
    list_display = ("order_id", "status", "reason", "created_at", "updated_at")
    list_filter = ("status",)
    search_fields = ("order_id__exact", "reason")
    ordering = ("-order_id",)


class ReservationStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return (("active", "active (holds stock)"), ("released", "released"))

    def queryset(self, request, queryset):
        if self.value() == "active":
            return queryset.filter(released_at=None)
        if self.value() == "released":
            return queryset.exclude(released_at=None)
        return queryset


@admin.register(StockReservation)
class StockReservationAdmin(ReadOnlyAdmin):
    list_display = ("order_id", "product", "quantity", "is_active", "created_at", "released_at")
    list_filter = (ReservationStateFilter,)
    list_select_related = ("product",)
    search_fields = ("order_id__exact", "product__sku")
    ordering = ("-order_id", "product_id")

    @admin.display(description="active", boolean=True)
    def is_active(self, reservation: StockReservation) -> bool:
        return reservation.active
