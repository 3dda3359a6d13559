import hashlib
import os

from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt


def index(request):
    return JsonResponse({"hello": "django", "pid": os.getpid(), "path": request.path,
                         "q": request.GET.get("q"), "remote": request.META.get("REMOTE_ADDR")})


@csrf_exempt
def upload(request):
    digest = hashlib.sha256()
    size = 0
    while chunk := request.read(65536):
        digest.update(chunk)
        size += len(chunk)
    return JsonResponse({"size": size, "sha256": digest.hexdigest()})


def stream(request):
    return StreamingHttpResponse((f"part{i};" for i in range(4)), content_type="text/plain")


def fail(request):
    raise RuntimeError("the view failed")


urlpatterns = [
    path("", index),
    path("upload", upload),
    path("stream", stream),
    path("error", fail),
    path("status", lambda request: HttpResponse(status=204)),
]
