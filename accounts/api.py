"""Agent API: register, login, logout, token renew."""

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from reclo_site.api.fields import StrictCharField
from reclo_site.api.schema import error_responses
from reclo_site.api.validation import valid_body
from reclo_site.errors import Code, ServiceError
from reclo_site.http import client_address

from . import services, twofactor
from .permissions import own_server, server_credential_may


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
        data = valid_body(RegisterInput, request)
        user = services.user_register(username=data["username"], email=data["email"], password=data["password"])
        token, key = services.token_create(user=user, name=data["token_name"], address=client_address(request))
        return _token_response(user, token, key, "Account created.", status.HTTP_201_CREATED)


class LoginInput(serializers.Serializer):
    email = StrictCharField(allow_blank=True, required=False, default="")
    password = StrictCharField(allow_blank=True, trim_whitespace=False, required=False, default="")
    otp = StrictCharField(
        allow_blank=True,
        required=False,
        default="",
        max_length=64,
        help_text="With two-factor on: the 6-digit code from the authenticator app, or a recovery code.",
    )
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
        data = valid_body(LoginInput, request)
        address = client_address(request)
        user = services.user_check_login(email=data["email"], password=data["password"], address=address)
        if twofactor.is_enabled(user):
            # The password was right; without a code the answer stays LOGIN_FAILED (207, the
            # contract's "does not match"), saying what is missing.
            if not data["otp"].strip():
                raise ServiceError(
                    Code.LOGIN_FAILED,
                    "This account uses two-factor authentication: send the 6-digit code from the "
                    "authenticator app (or a recovery code) as 'otp' with the email and password.",
                    field="otp",
                )
            device = twofactor.verify(user=user, code=data["otp"], address=address)
            services.login_completed(user=user, device=device, address=address)
        token, key = services.token_create(user=user, name=data["token_name"], address=client_address(request))
        return _token_response(user, token, key, "Logged in.", status.HTTP_200_OK)


class MessageOutput(serializers.Serializer):
    message = serializers.CharField()


class LogoutApi(APIView):
    # Acts on the calling credential only, so an agent may revoke its own.
    server_access = server_credential_may(POST=own_server)

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
    # Renews the calling credential only: an enrolled agent keeps working past
    # 60 days without anyone typing a password on the server. It gains nothing
    # by it that revoking the server does not take away at once.
    server_access = server_credential_may(POST=own_server)

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
