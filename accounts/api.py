"""Agent API: register, login, logout, token renew."""

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from reclo_site.api.fields import StrictCharField
from reclo_site.api.schema import error_responses
from reclo_site.errors import Code, ServiceError
from reclo_site.http import client_address

from . import services


class TokenOutput(serializers.Serializer):
    message = serializers.CharField()
    user_id = serializers.IntegerField()
    token = serializers.CharField(help_text="32 alphanumeric characters; shown only here.")
    token_expires = serializers.DateTimeField()


def _token_response(user, token, key, message, status_code):
    body = {"message": message, "user_id": user.pk, "token": key, "token_expires": token.expires}
    return Response(TokenOutput(body).data, status=status_code)


class RegisterInput(serializers.Serializer):
    username = StrictCharField(allow_blank=True, trim_whitespace=False, required=False, default="")
    email = StrictCharField(allow_blank=True, required=False, default="")
    password = StrictCharField(allow_blank=True, trim_whitespace=False, required=False, default="")
    token_name = StrictCharField(required=False, default="agent", max_length=100)


class RegisterApi(APIView):
    authentication_classes = []
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="register",
        tags=["accounts"],
        request=RegisterInput,
        responses={
            201: TokenOutput,
            **error_responses(
                Code.MALFORMED,
                Code.EMAIL_TAKEN,
                Code.BAD_USERNAME,
                Code.BAD_EMAIL,
                Code.BAD_PASSWORD,
                Code.STORAGE_PROVISIONING_FAILED,
            ),
        },
        auth=[],
    )
    def post(self, request):
        data = _valid(RegisterInput, request)
        user = services.user_register(username=data["username"], email=data["email"], password=data["password"])
        token, key = services.token_create(user=user, name=data["token_name"], address=client_address(request))
        return _token_response(user, token, key, "Account created.", status.HTTP_201_CREATED)


class LoginInput(serializers.Serializer):
    email = StrictCharField(allow_blank=True, required=False, default="")
    password = StrictCharField(allow_blank=True, trim_whitespace=False, required=False, default="")
    token_name = StrictCharField(required=False, default="agent", max_length=100)


class LoginApi(APIView):
    authentication_classes = []
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="login",
        tags=["accounts"],
        request=LoginInput,
        responses={
            200: TokenOutput,
            **error_responses(
                Code.MALFORMED,
                Code.ACCOUNT_DEACTIVATED,
                Code.LOGIN_FAILED,
                Code.LOGIN_BAD_EMAIL,
                Code.LOGIN_BAD_PASSWORD,
                Code.LOGIN_THROTTLED,
            ),
        },
        auth=[],
    )
    def post(self, request):
        data = _valid(LoginInput, request)
        user = services.user_check_login(
            email=data["email"], password=data["password"], address=client_address(request)
        )
        token, key = services.token_create(user=user, name=data["token_name"], address=client_address(request))
        return _token_response(user, token, key, "Logged in.", status.HTTP_200_OK)


class MessageOutput(serializers.Serializer):
    message = serializers.CharField()


class LogoutApi(APIView):
    @extend_schema(
        operation_id="logout",
        tags=["accounts"],
        request=None,
        responses={200: MessageOutput, **error_responses(Code.BAD_TOKEN, Code.TOKEN_DEACTIVATION_FAILED)},
    )
    def post(self, request):
        try:
            services.token_revoke(token=request.auth, address=client_address(request))
        except Exception as exc:  # noqa: BLE001 - docs/api.md has a code for this
            raise ServiceError(Code.TOKEN_DEACTIVATION_FAILED, "Failed to deactivate the token; try again.") from exc
        return Response({"message": "Logged out; this token no longer works."})


class TokenRenewApi(APIView):
    @extend_schema(
        operation_id="token_renew",
        tags=["accounts"],
        request=None,
        responses={
            200: inline_serializer(
                "TokenRenewOutput", {"message": serializers.CharField(), "token_expires": serializers.DateTimeField()}
            ),
            **error_responses(Code.BAD_TOKEN),
        },
    )
    def post(self, request):
        token = services.token_renew(token=request.auth)
        return Response(
            {"message": "Token renewed.", "token_expires": serializers.DateTimeField().to_representation(token.expires)}
        )


def _valid(serializer_class, request) -> dict:
    if not isinstance(request.data, dict):
        raise ServiceError(Code.MALFORMED, "The body must be a JSON object.")
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data
