# Stub for the optional C accelerator built from _fastparse.c (see that file and setup.py).

SOURCE_HASH: str

Scanned = tuple[
    bool,  # is_response
    int | str,  # status | method
    str,  # reason | Request-URI
    list[str],  # lines
    list[str],  # names
    dict[str, int],  # pos
    list[int],  # offs
    list[int],  # blens
    str,  # call_id
    int,  # cseq number
    str,  # cseq method
    str,  # via transport
    str,  # via host
    int | None,  # via port
    dict[str, str | None],  # via params
    str | None,  # from display
    str,  # from uri
    dict[str, str | None],  # from params
    str | None,  # to display
    str,  # to uri
    dict[str, str | None],  # to params
    int | None,  # max_forwards
    int | None,  # content_length
]

def scan(
    data: bytes,
    base: int,
    head_end: int,
    max_line: int,
    max_headers: int,
    name_cache: dict[str, str],
    /,
) -> Scanned | None: ...

def known_names() -> dict[str, str]: ...
