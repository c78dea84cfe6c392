from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT64: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
UINT8: DType
FLOAT16: DType
INT64: DType

class Tensor(_message.Message):
    __slots__ = ("name", "shape", "dtype", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("edge_id", "model_id", "model_sha256", "auth_token", "norm_names")
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NORM_NAMES_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    model_id: str
    model_sha256: str
    auth_token: str
    norm_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, edge_id: _Optional[str] = ..., model_id: _Optional[str] = ..., model_sha256: _Optional[str] = ..., auth_token: _Optional[str] = ..., norm_names: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("version", "next_sequence", "max_message_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    next_sequence: int
    max_message_bytes: int
    def __init__(self, version: _Optional[int] = ..., next_sequence: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("edge_id", "sequence", "images", "entropies", "labels", "edge_version", "auth_token", "seen", "episode")
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ENTROPIES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    EDGE_VERSION_FIELD_NUMBER: _ClassVar[int]
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SEEN_FIELD_NUMBER: _ClassVar[int]
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    sequence: int
    images: Tensor
    entropies: _containers.RepeatedScalarFieldContainer[float]
    labels: _containers.RepeatedScalarFieldContainer[int]
    edge_version: int
    auth_token: str
    seen: int
    episode: int
    def __init__(self, edge_id: _Optional[str] = ..., sequence: _Optional[int] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ..., entropies: _Optional[_Iterable[float]] = ..., labels: _Optional[_Iterable[int]] = ..., edge_version: _Optional[int] = ..., auth_token: _Optional[str] = ..., seen: _Optional[int] = ..., episode: _Optional[int] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("sequence", "duplicate", "accepted", "latest_version")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    duplicate: bool
    accepted: int
    latest_version: int
    def __init__(self, sequence: _Optional[int] = ..., duplicate: _Optional[bool] = ..., accepted: _Optional[int] = ..., latest_version: _Optional[int] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("edge_id", "after_version", "auth_token")
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    after_version: int
    auth_token: str
    def __init__(self, edge_id: _Optional[str] = ..., after_version: _Optional[int] = ..., auth_token: _Optional[str] = ...) -> None: ...

class ParameterUpdate(_message.Message):
    __slots__ = ("version", "tensors", "created_unix", "cloud_step", "episode")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    CLOUD_STEP_FIELD_NUMBER: _ClassVar[int]
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    version: int
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    created_unix: float
    cloud_step: int
    episode: int
    def __init__(self, version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., created_unix: _Optional[float] = ..., cloud_step: _Optional[int] = ..., episode: _Optional[int] = ...) -> None: ...

class MetricsReport(_message.Message):
    __slots__ = ("edge_id", "step", "values", "auth_token")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    step: int
    values: _containers.ScalarMap[str, float]
    auth_token: str
    def __init__(self, edge_id: _Optional[str] = ..., step: _Optional[int] = ..., values: _Optional[_Mapping[str, float]] = ..., auth_token: _Optional[str] = ...) -> None: ...

class MetricsAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetRequest(_message.Message):
    __slots__ = ("edge_id", "episode", "auth_token")
    EDGE_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    edge_id: str
    episode: int
    auth_token: str
    def __init__(self, edge_id: _Optional[str] = ..., episode: _Optional[int] = ..., auth_token: _Optional[str] = ...) -> None: ...

class ResetReply(_message.Message):
    __slots__ = ("version", "episode")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    version: int
    episode: int
    def __init__(self, version: _Optional[int] = ..., episode: _Optional[int] = ...) -> None: ...
