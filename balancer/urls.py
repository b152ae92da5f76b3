from django.urls import path

from .views import SelectView

urlpatterns = [path("balancer/select/", SelectView.as_view(), name="balancer-select")]
