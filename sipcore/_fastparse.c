/* Optional accelerator for sipcore.message: recognise a SIP message of the common shape and
 * build its parsed form directly.
 *
 * parse(data, stream, max_line, max_headers, max_size, name_cache) either returns None --
 * "not the common shape, use the pure-Python parser" -- or the Request / Response object
 * sipcore.message._parse would have built for data, every slot filled as _parse fills it.
 * It never rejects anything and never raises for bad input: every verdict (400, 413, 505,
 * 513, ...) stays with the Python code, which sees every message this function declines.  So
 * all it has to guarantee is that for the messages it accepts, its result equals the
 * pure-Python one; tests/sipcore/test_fastparse.py compares the two on the RFC 4475
 * messages and on generated and mutated ones, and bench/fuzz_fastparse.py does the same
 * under AddressSanitizer and UBSan.
 *
 * configure(Request, Response, Via, NameAddr, CSeq) must be called once first: parse()
 * allocates instances of those classes (tp_alloc, as cls.__new__(cls) does) and stores into
 * their __slots__ directly, at the offsets of the slots' member descriptors, which
 * configure() looks up and checks.  That is what makes the accelerator fast: no result
 * tuple to unpack, no __init__ frames, no attribute lookups per message.
 *
 * What it accepts is a subset of what the regex fast paths in sipcore.headers and
 * sipcore.message accept (same grammar, written out by hand):
 *   - leading CRLFs skipped; the header block ends at the first empty line, within
 *     max_size + 4 bytes;
 *   - ASCII only; every CR and LF part of a CRLF; no line longer than max_line; no folding;
 *   - Request-Line  [A-Z]+ SP sips?:[!#-;=@-~]+ SP SIP/2.0
 *     Status-Line   SIP/2.0 SP [1-6][0-9][0-9] SP reason;
 *   - every header name as written (up to its colon) a known spelling (the table below,
 *     else an interned entry of name_cache: sipcore.headers._NAME_CACHE), at most
 *     max_headers fields;
 *   - To, From, Call-ID, CSeq, Via present, the singletons not repeated, and the values of
 *     Call-ID, CSeq (< 10 digits, method equal to the request's), the first value of the
 *     first Via field (no typed parameter that needs checking), From, To (<URI> forms, no bare ;tag),
 *     Max-Forwards (<= 255) and Content-Length in the shapes of _CALL_ID_VALUE, _CSEQ_VALUE,
 *     _VIA_VALUE, _NAME_ADDR_VALUE and _DIGITS_VALUE;
 *   - a body that Content-Length frames without an error (sipcore.message._set_body).
 * A lone Route field holding one <URI> value is parsed too (what SipMessage.routes would
 * cache on first use, since a proxy always reads it); any other Route is left for the lazy
 * Python accessor, without declining the message.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include "structmember.h" /* T_OBJECT_EX, READONLY (3.11) */

#ifndef SOURCE_HASH
#define SOURCE_HASH ""
#endif

/* Character classes (RFC 3261 §25.1), as in the Python regexes. */
#define C_TOKEN 1   /* [A-Za-z0-9\-.!%*_+`'~] */
#define C_GV 2      /* token + ":[]" (Via gen-value) */
#define C_WORD 4    /* token + ()<>:\"/[]?{} (Call-ID) */
#define C_RURI 8    /* [!#-;=@-~]: printable ASCII but SP < > " ? */
#define C_HOST 16   /* [A-Za-z0-9\-._] */
#define C_HEX6 32   /* [0-9A-Fa-f.] and ":" handled apart: IPv6 reference */
#define C_SCHEME 64 /* [A-Za-z0-9+\-.] */
#define C_DIGIT 128

static unsigned char cls[256];

static void
init_classes(void)
{
    const char *alnum = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    const char *p;
    int c;
    for (p = alnum; *p; p++) {
        cls[(unsigned char)*p] |= C_TOKEN | C_GV | C_WORD | C_HOST | C_SCHEME;
    }
    for (p = "-.!%*_+`'~"; *p; p++) {
        cls[(unsigned char)*p] |= C_TOKEN | C_GV | C_WORD;
    }
    for (p = ":[]"; *p; p++) {
        cls[(unsigned char)*p] |= C_GV;
    }
    for (p = "()<>:\\\"/[]?{}"; *p; p++) {
        cls[(unsigned char)*p] |= C_WORD;
    }
    for (c = 0x21; c <= 0x7e; c++) {
        if (c != '"' && c != '<' && c != '>' && c != '?') {
            cls[c] |= C_RURI;
        }
    }
    for (p = "-._"; *p; p++) {
        cls[(unsigned char)*p] |= C_HOST;
    }
    for (p = "0123456789abcdefABCDEF."; *p; p++) {
        cls[(unsigned char)*p] |= C_HEX6;
    }
    for (p = "+-."; *p; p++) {
        cls[(unsigned char)*p] |= C_SCHEME;
    }
    for (c = '0'; c <= '9'; c++) {
        cls[c] |= C_DIGIT;
    }
}

#define IS(c, k) (cls[(unsigned char)(c)] & (k))

static const char *
span(const char *p, const char *end, int k)
{
    while (p < end && IS(*p, k)) {
        p++;
    }
    return p;
}

static const char *
skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t')) {
        p++;
    }
    return p;
}

/* A str of [p, end), which the caller has checked is ASCII. */
static PyObject *
str_of(const char *p, const char *end)
{
    PyObject *s = PyUnicode_New(end - p, 127);
    if (s != NULL) {
        memcpy(PyUnicode_1BYTE_DATA(s), p, end - p);
    }
    return s;
}

/* ------------------------------------------------------------------ interned strs */

/* Parameter names the parser compares or stores often (their hashes are computed once). */
enum { K_TAG, K_BRANCH, K_RPORT, K_RECEIVED, K_MADDR, K_TTL, K_LR, K_TRANSPORT, K_COUNT };
static const char *const key_text[K_COUNT] = {
    "tag", "branch", "rport", "received", "maddr", "ttl", "lr", "transport",
};
static Py_ssize_t key_len[K_COUNT];
static PyObject *keys[K_COUNT];

/* Methods and Via transports as commonly written: the same str object every time instead
 * of a new one per message (they compare equal to what Python would have sliced). */
static const char *const method_text[] = {
    "INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS", "INFO", "PRACK",
    "UPDATE", "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "PUBLISH",
};
#define N_METHODS ((int)(sizeof(method_text) / sizeof(method_text[0])))
static PyObject *methods_str[N_METHODS];
static const char *const transport_text[] = {"UDP", "TCP", "TLS", "SCTP", "WS", "WSS"};
#define N_TRANSPORTS ((int)(sizeof(transport_text) / sizeof(transport_text[0])))
static PyObject *transports_str[N_TRANSPORTS];
static PyObject *sip_2_0; /* "SIP/2.0", Via.protocol */

/* A cached str equal to [p, end) from table[0..n), else a new str. */
static PyObject *
cached_str(const char *p, const char *end, const char *const *table, PyObject **objs, int n)
{
    Py_ssize_t len = end - p;
    int k;
    for (k = 0; k < n; k++) {
        if (table[k][0] == *p && (Py_ssize_t)strlen(table[k]) == len &&
            memcmp(table[k], p, len) == 0) {
            return Py_NewRef(objs[k]);
        }
    }
    return str_of(p, end);
}

/* Header names as commonly written -> canonical name: the entries sipcore.headers puts in
 * _NAME_CACHE before any message is seen (known_names() returns this table so a test can
 * check that).  Looked up through a small open-addressing hash table; a name not here is
 * looked up in the cache passed to parse(). */
static const char *const name_table[][2] = {
    {"Via", "via"}, {"via", "via"}, {"v", "via"}, {"V", "via"},
    {"From", "from"}, {"from", "from"}, {"f", "from"}, {"F", "from"},
    {"To", "to"}, {"to", "to"}, {"t", "to"}, {"T", "to"},
    {"Call-ID", "call-id"}, {"call-id", "call-id"}, {"i", "call-id"}, {"I", "call-id"},
    {"CSeq", "cseq"}, {"cseq", "cseq"},
    {"Max-Forwards", "max-forwards"}, {"max-forwards", "max-forwards"},
    {"Contact", "contact"}, {"contact", "contact"}, {"m", "contact"}, {"M", "contact"},
    {"Content-Length", "content-length"}, {"content-length", "content-length"},
    {"l", "content-length"}, {"L", "content-length"},
    {"Content-Type", "content-type"}, {"content-type", "content-type"},
    {"c", "content-type"}, {"C", "content-type"},
    {"Route", "route"}, {"route", "route"},
    {"Record-Route", "record-route"}, {"record-route", "record-route"},
    {"Expires", "expires"}, {"expires", "expires"},
    {"Allow", "allow"}, {"allow", "allow"},
    {"Supported", "supported"}, {"supported", "supported"}, {"k", "supported"},
    {"K", "supported"},
    {"User-Agent", "user-agent"}, {"user-agent", "user-agent"},
    {"Authorization", "authorization"}, {"authorization", "authorization"},
    {"Proxy-Authorization", "proxy-authorization"},
    {"proxy-authorization", "proxy-authorization"},
    {"WWW-Authenticate", "www-authenticate"}, {"www-authenticate", "www-authenticate"},
    {"Proxy-Authenticate", "proxy-authenticate"},
    {"proxy-authenticate", "proxy-authenticate"},
    {"Require", "require"}, {"require", "require"},
    {"Proxy-Require", "proxy-require"}, {"proxy-require", "proxy-require"},
    {"Event", "event"}, {"event", "event"}, {"o", "event"}, {"O", "event"},
    {"Subject", "subject"}, {"subject", "subject"}, {"s", "subject"}, {"S", "subject"},
    {"Server", "server"}, {"server", "server"},
    {"Date", "date"}, {"date", "date"},
    {"Accept", "accept"}, {"accept", "accept"},
};
#define N_NAMES ((int)(sizeof(name_table) / sizeof(name_table[0])))
static PyObject *name_canon[N_NAMES];
static Py_ssize_t name_len[N_NAMES];
#define NAME_SLOTS 256 /* power of two, well above N_NAMES: short probe runs */
static signed char name_slot[NAME_SLOTS]; /* index into name_table, -1 for empty */

/* The canonical names parse() tells apart (interned: the names list and the cache hold
 * these very objects, so they are recognised by identity). */
enum { H_VIA, H_FROM, H_TO, H_CALL_ID, H_CSEQ, H_MAX_FORWARDS, H_CONTENT_LENGTH, H_ROUTE, H_COUNT };
static const char *const header_text[H_COUNT] = {
    "via", "from", "to", "call-id", "cseq", "max-forwards", "content-length", "route",
};
static PyObject *headers_str[H_COUNT];

static unsigned int
name_hash(const char *p, Py_ssize_t n)
{
    unsigned int h = 2166136261u; /* FNV-1a */
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        h = (h ^ (unsigned char)p[i]) * 16777619u;
    }
    return h;
}

/* Canonical name (borrowed) for the name written as [p, end), from the table, else NULL. */
static PyObject *
known_name(const char *p, const char *end)
{
    Py_ssize_t n = end - p;
    unsigned int h = name_hash(p, n) & (NAME_SLOTS - 1);
    for (;;) {
        int k = name_slot[h];
        if (k < 0) {
            return NULL;
        }
        if (name_len[k] == n && memcmp(name_table[k][0], p, n) == 0) {
            return name_canon[k];
        }
        h = (h + 1) & (NAME_SLOTS - 1);
    }
}

/* ------------------------------------------------------------------ classes and slots */

/* The classes parse() instantiates and the offsets of the slots it fills, from configure().
 * Every slot of SipMessage, Request, Response, Via and NameAddr is listed here; a test
 * checks that none is left unset (a slot added in Python but not here would be). */
enum {
    M_ASCII, M_BLENS, M_BODY_OFFSET, M_CALL_ID, M_CONTACTS, M_CSEQ, M_FROM, M_LINES,
    M_MAX_FORWARDS, M_NAMES, M_OFFS, M_POS, M_RECORD_ROUTES, M_ROUTES, M_START_BLEN, M_TO,
    M_TOP_VIA, M_TOP_VIA_TEXT, M_VIAS, M_BODY, M_RAW,
    M_REQUEST_URI, M_METHOD, M_URI, /* Request */
    M_REASON, M_STATUS,             /* Response */
    M_COUNT
};
static const char *const msg_slot_text[M_COUNT] = {
    "_ascii", "_blens", "_body_offset", "_call_id", "_contacts", "_cseq", "_from", "_lines",
    "_max_forwards", "_names", "_offs", "_pos", "_record_routes", "_routes", "_start_blen",
    "_to", "_top_via", "_top_via_text", "_vias", "body", "raw",
    "_request_uri", "method", "uri",
    "reason", "status",
};
#define M_FIRST_REQUEST M_REQUEST_URI
#define M_FIRST_RESPONSE M_REASON
enum { V_TRANSPORT, V_HOST, V_PORT, V_PARAMS, V_PROTOCOL, V_COUNT };
static const char *const via_slot_text[V_COUNT] = {
    "transport", "host", "port", "params", "protocol",
};
enum { N_PARSED, N_DISPLAY, N_IS_STAR, N_PARAMS, N_URI, N_COUNT };
static const char *const na_slot_text[N_COUNT] = {
    "_parsed", "display", "is_star", "params", "uri",
};

static PyTypeObject *t_request, *t_response, *t_via, *t_name_addr, *t_cseq;
static Py_ssize_t off_request[M_COUNT], off_response[M_COUNT], off_via[V_COUNT],
    off_na[N_COUNT];

/* Store v (a new reference, stolen) in the slot at offset off of a freshly allocated obj
 * (whose slots are all NULL). */
#define SET(obj, off, v) (*(PyObject **)((char *)(obj) + (off)) = (v))

/* The offset of slot `name` of `type`: its member descriptor must be a writable object
 * slot of type or a base of it. */
static int
slot_offset(PyTypeObject *type, const char *name, Py_ssize_t *out)
{
    PyObject *d = PyObject_GetAttrString((PyObject *)type, name);
    PyMemberDef *m;
    if (d == NULL) {
        if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s has no slot %s", type->tp_name, name);
        }
        return -1;
    }
    if (!Py_IS_TYPE(d, &PyMemberDescr_Type) ||
        !PyType_IsSubtype(type, PyDescr_TYPE(d))) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a __slots__ member", type->tp_name, name);
        Py_DECREF(d);
        return -1;
    }
    m = ((PyMemberDescrObject *)d)->d_member;
    Py_DECREF(d);
    if (m->type != T_OBJECT_EX || (m->flags & READONLY) || m->offset <= 0 ||
        (size_t)m->offset + sizeof(PyObject *) > (size_t)type->tp_basicsize) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a writable object slot", type->tp_name,
                     name);
        return -1;
    }
    *out = m->offset;
    return 0;
}

static int
plain_class(PyObject *obj, PyTypeObject *base)
{
    PyTypeObject *t;
    if (!PyType_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "configure() takes classes");
        return 0;
    }
    t = (PyTypeObject *)obj;
    if (t == base || !PyType_IsSubtype(t, base) ||
        (base == &PyBaseObject_Type && t->tp_itemsize != 0)) {
        PyErr_Format(PyExc_TypeError, "%s: unexpected class layout", t->tp_name);
        return 0;
    }
    return 1;
}

static PyObject *
configure(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyTypeObject *req, *resp, *via, *na;
    int k;
    (void)module;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "configure(Request, Response, Via, NameAddr, CSeq) takes 5 arguments");
        return NULL;
    }
    for (k = 0; k < 4; k++) {
        if (!plain_class(args[k], &PyBaseObject_Type)) {
            return NULL;
        }
    }
    if (!plain_class(args[4], &PyTuple_Type)) {
        return NULL;
    }
    req = (PyTypeObject *)args[0];
    resp = (PyTypeObject *)args[1];
    via = (PyTypeObject *)args[2];
    na = (PyTypeObject *)args[3];
    for (k = 0; k < M_COUNT; k++) {
        if (k < M_FIRST_RESPONSE && slot_offset(req, msg_slot_text[k], &off_request[k]) < 0) {
            return NULL;
        }
        if ((k < M_FIRST_REQUEST || k >= M_FIRST_RESPONSE) &&
            slot_offset(resp, msg_slot_text[k], &off_response[k]) < 0) {
            return NULL;
        }
    }
    for (k = 0; k < V_COUNT; k++) {
        if (slot_offset(via, via_slot_text[k], &off_via[k]) < 0) {
            return NULL;
        }
    }
    for (k = 0; k < N_COUNT; k++) {
        if (slot_offset(na, na_slot_text[k], &off_na[k]) < 0) {
            return NULL;
        }
    }
    Py_XSETREF(t_request, (PyTypeObject *)Py_NewRef(args[0]));
    Py_XSETREF(t_response, (PyTypeObject *)Py_NewRef(args[1]));
    Py_XSETREF(t_via, (PyTypeObject *)Py_NewRef(args[2]));
    Py_XSETREF(t_name_addr, (PyTypeObject *)Py_NewRef(args[3]));
    Py_XSETREF(t_cseq, (PyTypeObject *)Py_NewRef(args[4]));
    Py_RETURN_NONE;
}

static PyObject *
new_instance(PyTypeObject *type)
{
    return type->tp_alloc(type, 0);
}

/* ------------------------------------------------------------------ values */

/* Status of the helpers: 1 matched, 0 not the common shape, -1 Python error set. */

/* The interned parameter name equal to lower([p, end)), or a new str. */
static PyObject *
param_key(const char *p, const char *end)
{
    Py_ssize_t n = end - p, i;
    PyObject *s;
    Py_UCS1 *out;
    int k;
    for (k = 0; k < K_COUNT; k++) {
        const char *t = key_text[k];
        if (key_len[k] != n) {
            continue;
        }
        for (i = 0; i < n; i++) {
            char c = p[i];
            if (c >= 'A' && c <= 'Z') {
                c = (char)(c + 32);
            }
            if (c != t[i]) {
                break;
            }
        }
        if (i == n) {
            return Py_NewRef(keys[k]);
        }
    }
    s = PyUnicode_New(n, 127);
    if (s == NULL) {
        return NULL;
    }
    out = PyUnicode_1BYTE_DATA(s);
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        out[i] = (c >= 'A' && c <= 'Z') ? (Py_UCS1)(c + 32) : (Py_UCS1)c;
    }
    return s;
}

/* params[lower(name)] = str(value) or None (value NULL). */
static int
set_param(PyObject *params, const char *n, const char *ne, const char *v, const char *ve)
{
    PyObject *key, *value;
    int rc;
    key = param_key(n, ne);
    if (key == NULL) {
        return -1;
    }
    value = v != NULL ? str_of(v, ve) : Py_NewRef(Py_None);
    if (value == NULL) {
        Py_DECREF(key);
        return -1;
    }
    rc = PyDict_SetItem(params, key, value);
    Py_DECREF(key);
    Py_DECREF(value);
    return rc;
}

/* Digits [p, end), at most 10 of them (callers check), as an integer. */
static long long
digits_value(const char *p, const char *end)
{
    long long v = 0;
    for (; p < end; p++) {
        v = v * 10 + (*p - '0');
    }
    return v;
}

/* [ \t]* [0-9]{1,maxd} [ \t]* filling the whole value. */
static int
parse_digits(const char *p, const char *end, int maxd, long long *out)
{
    const char *d;
    p = skip_ws(p, end);
    d = span(p, end, C_DIGIT);
    if (d == p || d - p > maxd || skip_ws(d, end) != end) {
        return 0;
    }
    *out = digits_value(p, d);
    return 1;
}

/* _CALL_ID_VALUE: [ \t]* word ("@" word)? [ \t]* */
static int
parse_call_id(const char *p, const char *end, PyObject **out)
{
    const char *start, *q;
    p = skip_ws(p, end);
    start = p;
    q = span(p, end, C_WORD);
    if (q == p) {
        return 0;
    }
    if (q < end && *q == '@') {
        const char *r = span(q + 1, end, C_WORD);
        if (r == q + 1) {
            return 0;
        }
        q = r;
    }
    if (skip_ws(q, end) != end) {
        return 0;
    }
    *out = str_of(start, q);
    return *out == NULL ? -1 : 1;
}

/* _CSEQ_VALUE with fewer than 10 digits: [ \t]* digits [ \t]+ token [ \t]*, as a CSeq.
 * method is the request's method (its str is reused), or NULL for a response. */
static int
parse_cseq(const char *p, const char *end, PyObject *method, PyObject **out)
{
    const char *d, *m, *q;
    PyObject *cseq, *num, *name;
    p = skip_ws(p, end);
    d = span(p, end, C_DIGIT);
    if (d == p || d - p > 9) {
        return 0;
    }
    m = skip_ws(d, end);
    if (m == d) {
        return 0;
    }
    q = span(m, end, C_TOKEN);
    if (q == m || skip_ws(q, end) != end) {
        return 0;
    }
    if (method != NULL) {
        /* The request's method is [A-Z]+, ASCII: compare the bytes. */
        if (PyUnicode_GET_LENGTH(method) != q - m ||
            memcmp(PyUnicode_1BYTE_DATA(method), m, q - m) != 0) {
            return 0;
        }
        name = Py_NewRef(method);
    }
    else {
        name = cached_str(m, q, method_text, methods_str, N_METHODS);
        if (name == NULL) {
            return -1;
        }
    }
    num = PyLong_FromLongLong(digits_value(p, d));
    if (num == NULL) {
        Py_DECREF(name);
        return -1;
    }
    cseq = t_cseq->tp_alloc(t_cseq, 2); /* tuple.__new__(CSeq, (num, name)) */
    if (cseq == NULL) {
        Py_DECREF(num);
        Py_DECREF(name);
        return -1;
    }
    PyTuple_SET_ITEM(cseq, 0, num);
    PyTuple_SET_ITEM(cseq, 1, name);
    *out = cseq;
    return 1;
}

/* ;name[=value] pieces of a Via (_VIA_FAST: no LWS, values gen-value chars), into a dict
 * with lower-cased names -- what sipcore.headers._via_from_match builds. */
static int
parse_via_params(const char *p, const char *end, PyObject *params)
{
    while (p < end) {
        const char *n, *ne, *v, *ve;
        if (*p != ';') {
            return 0;
        }
        n = p + 1;
        ne = span(n, end, C_TOKEN);
        if (ne == n) {
            return 0;
        }
        v = ve = NULL;
        p = ne;
        if (p < end && *p == '=') {
            v = p + 1;
            ve = span(v, end, C_GV);
            if (ve == v) {
                return 0;
            }
            p = ve;
        }
        if (set_param(params, n, ne, v, ve) < 0) {
            return -1;
        }
    }
    return 1;
}

/* _VIA_VALUE: [ \t]* SIP/2.0/transport SP host [":" port] params [ \t]*, as a Via. */
static int
parse_via(const char *p, const char *end, PyObject **out)
{
    const char *t, *te, *h, *he, *q;
    PyObject *via, *params, *v;
    long long port = -1;
    char upper[16];
    Py_ssize_t i;
    int rc;
    /* A field holding several values ("SIP/2.0/UDP a;branch=x, SIP/2.0/UDP b", as SIPp and
     * many UAs write a response's Vias): the top Via is the first value, as split_values
     * would cut it.  A quote or '<' before the comma is not in the accepted classes, so the
     * comma found here is always a list separator.  The other values are read lazily, but
     * split_values checks the quotes and brackets of the whole field: leave those to it. */
    q = memchr(p, ',', (size_t)(end - p));
    if (q != NULL) {
        if (memchr(q, '"', (size_t)(end - q)) != NULL ||
            memchr(q, '<', (size_t)(end - q)) != NULL) {
            return 0;
        }
        end = q;
    }
    p = skip_ws(p, end);
    while (end > p && (end[-1] == ' ' || end[-1] == '\t')) {
        end--;
    }
    if (end - p < 8 || memcmp(p, "SIP/2.0/", 8) != 0) {
        return 0;
    }
    t = p + 8;
    te = span(t, end, C_TOKEN);
    if (te == t || te >= end || *te != ' ') {
        return 0;
    }
    h = te + 1;
    if (h < end && *h == '[') {
        /* \[ [0-9A-Fa-f.]* : [0-9A-Fa-f:.]* \] */
        q = span(h + 1, end, C_HEX6);
        if (q >= end || *q != ':') {
            return 0;
        }
        while (q < end && (IS(*q, C_HEX6) || *q == ':')) {
            q++;
        }
        if (q >= end || *q != ']') {
            return 0;
        }
        he = q + 1;
    }
    else {
        he = span(h, end, C_HOST);
        if (he == h) {
            return 0;
        }
    }
    q = he;
    if (q < end && *q == ':') {
        const char *d = span(q + 1, end, C_DIGIT);
        if (d == q + 1 || d - (q + 1) > 5) {
            return 0;
        }
        port = digits_value(q + 1, d);
        if (port > 65535) {
            return 0;
        }
        q = d;
    }

    via = new_instance(t_via);
    if (via == NULL) {
        return -1;
    }
    params = PyDict_New();
    if (params == NULL) {
        goto error;
    }
    SET(via, off_via[V_PARAMS], params);
    rc = parse_via_params(q, end, params);
    if (rc <= 0) {
        Py_DECREF(via);
        return rc;
    }
    /* The typed parameters _via_from_match hands to _check_via_params: leave them to it. */
    v = PyDict_GetItemWithError(params, keys[K_RPORT]);
    if ((v != NULL && v != Py_None) || PyDict_GetItemWithError(params, keys[K_TTL]) != NULL ||
        PyDict_GetItemWithError(params, keys[K_BRANCH]) == Py_None ||
        PyDict_GetItemWithError(params, keys[K_RECEIVED]) == Py_None ||
        PyDict_GetItemWithError(params, keys[K_MADDR]) == Py_None) {
        Py_DECREF(via);
        return 0;
    }
    if (PyErr_Occurred()) {
        goto error;
    }
    /* transport.upper() */
    if (te - t <= (Py_ssize_t)sizeof(upper)) {
        for (i = 0; i < te - t; i++) {
            unsigned char c = (unsigned char)t[i];
            upper[i] = (char)((c >= 'a' && c <= 'z') ? c - 32 : c);
        }
        v = cached_str(upper, upper + (te - t), transport_text, transports_str, N_TRANSPORTS);
    }
    else {
        v = PyUnicode_New(te - t, 127);
        if (v != NULL) {
            Py_UCS1 *o = PyUnicode_1BYTE_DATA(v);
            for (i = 0; i < te - t; i++) {
                unsigned char c = (unsigned char)t[i];
                o[i] = (Py_UCS1)((c >= 'a' && c <= 'z') ? c - 32 : c);
            }
        }
    }
    if (v == NULL) {
        goto error;
    }
    SET(via, off_via[V_TRANSPORT], v);
    v = str_of(h, he);
    if (v == NULL) {
        goto error;
    }
    SET(via, off_via[V_HOST], v);
    v = port < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(port);
    if (v == NULL) {
        goto error;
    }
    SET(via, off_via[V_PORT], v);
    SET(via, off_via[V_PROTOCOL], Py_NewRef(sip_2_0));
    *out = via;
    return 1;
error:
    Py_DECREF(via);
    return -1;
}

/* _PARAMS_FAST, as _fast_params reads it:
 * ( [ \t]* ";" [ \t]* token ( [ \t]* "=" [ \t]* (gen-value | "[^"\\;]*") )? )* [ \t]* */
static int
parse_header_params(const char *p, const char *end, PyObject *params)
{
    for (;;) {
        const char *n, *ne, *v = NULL, *ve = NULL;
        p = skip_ws(p, end);
        if (p == end) {
            return 1;
        }
        if (*p != ';') {
            return 0;
        }
        n = skip_ws(p + 1, end);
        ne = span(n, end, C_TOKEN);
        if (ne == n) {
            return 0;
        }
        p = skip_ws(ne, end);
        if (p < end && *p == '=') {
            v = skip_ws(p + 1, end);
            if (v < end && *v == '"') {
                ve = v + 1;
                while (ve < end && *ve != '"' && *ve != '\\' && *ve != ';') {
                    ve++;
                }
                if (ve >= end || *ve != '"') {
                    return 0;
                }
                ve++;
            }
            else {
                ve = span(v, end, C_GV);
                if (ve == v) {
                    return 0;
                }
            }
            p = ve;
        }
        else {
            p = ne; /* whitespace after a bare name is skipped at the top of the loop */
        }
        if (set_param(params, n, ne, v, ve) < 0) {
            return -1;
        }
    }
}

/* _NAME_ADDR_VALUE: [ \t]* ( "display" [ \t]* | token ([ \t]+ token)* [ \t]* )?
 *                   "<" scheme ":" [^<>" \t]+ ">" params
 * as a NameAddr.  Display names with anything but printable ASCII, and URIs with control
 * characters, are left to Python (a subset of what the regex takes). */
static int
parse_name_addr(const char *p, const char *end, PyObject **out)
{
    const char *u, *ue, *q, *ds = NULL, *de = NULL;
    PyObject *na, *v;
    int rc, words = 0;
    p = skip_ws(p, end);
    if (p < end && *p == '"') {
        q = p + 1;
        while (q < end && *q != '"' && *q != '\\' && *q >= 0x20 && *q < 0x7f) {
            q++;
        }
        if (q >= end || *q != '"') {
            return 0;
        }
        ds = p + 1;
        de = q;
        p = skip_ws(q + 1, end);
    }
    else if (p < end && IS(*p, C_TOKEN)) {
        /* token words separated by LWS; joined by single spaces, as _name_addr_from_match */
        const char *w = p;
        ds = p;
        for (;;) {
            const char *we = span(w, end, C_TOKEN);
            if (we == w) {
                break;
            }
            words++;
            de = we;
            w = skip_ws(we, end);
        }
        p = w;
    }
    if (p >= end || *p != '<') {
        return 0;
    }
    u = p + 1;
    q = u;
    if (q >= end || !((*q >= 'A' && *q <= 'Z') || (*q >= 'a' && *q <= 'z'))) {
        return 0;
    }
    q = span(q + 1, end, C_SCHEME);
    if (q >= end || *q != ':') {
        return 0;
    }
    q++;
    ue = q;
    while (ue < end && *ue > 0x20 && *ue < 0x7f && *ue != '<' && *ue != '>' && *ue != '"') {
        ue++;
    }
    if (ue == q || ue >= end || *ue != '>') {
        return 0;
    }

    na = new_instance(t_name_addr);
    if (na == NULL) {
        return -1;
    }
    SET(na, off_na[N_PARSED], Py_NewRef(Py_None));
    SET(na, off_na[N_IS_STAR], Py_NewRef(Py_False));
    v = PyDict_New();
    if (v == NULL) {
        goto error;
    }
    SET(na, off_na[N_PARAMS], v);
    rc = parse_header_params(ue + 1, end, v);
    if (rc <= 0) {
        Py_DECREF(na);
        return rc;
    }
    if (ds == NULL) {
        v = Py_NewRef(Py_None);
    }
    else if (words > 1) {
        /* the words of [ds, de) joined by single spaces */
        const char *w = ds;
        Py_ssize_t n = 0;
        Py_UCS1 *o;
        while (w < de) {
            const char *we = span(w, de, C_TOKEN);
            n += (we - w) + 1;
            w = skip_ws(we, de);
        }
        v = PyUnicode_New(n - 1, 127);
        if (v != NULL) {
            o = PyUnicode_1BYTE_DATA(v);
            w = ds;
            while (w < de) {
                const char *we = span(w, de, C_TOKEN);
                memcpy(o, w, we - w);
                o += we - w;
                w = skip_ws(we, de);
                if (w < de) {
                    *o++ = ' ';
                }
            }
        }
    }
    else {
        v = str_of(ds, de);
    }
    if (v == NULL) {
        goto error;
    }
    SET(na, off_na[N_DISPLAY], v);
    v = str_of(u, ue);
    if (v == NULL) {
        goto error;
    }
    SET(na, off_na[N_URI], v);
    *out = na;
    return 1;
error:
    Py_DECREF(na);
    return -1;
}

/* A From/To value: a name-addr whose tag parameter, if any, has a value (a bare ;tag is
 * a 400 that _parse decides). */
static int
parse_from_to(const char *p, const char *end, PyObject **out)
{
    PyObject *params;
    int rc = parse_name_addr(p, end, out);
    if (rc <= 0) {
        return rc;
    }
    params = *(PyObject **)((char *)*out + off_na[N_PARAMS]);
    if (PyDict_GetItemWithError(params, keys[K_TAG]) == Py_None) {
        Py_CLEAR(*out);
        return 0;
    }
    if (PyErr_Occurred()) {
        Py_CLEAR(*out);
        return -1;
    }
    return 1;
}

/* ------------------------------------------------------------------ the header block */

/* Nonzero when one of the 8 bytes of w is CR, LF or >= 0x80 (SWAR: the "has a zero byte"
 * test on w ^ CR and w ^ LF, exact for presence). */
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL
static inline uint64_t
special_bytes(uint64_t w)
{
    uint64_t cr = w ^ (ONES * '\r'), lf = w ^ (ONES * '\n');
    return (((cr - ONES) & ~cr) | ((lf - ONES) & ~lf) | w) & HIGHS;
}

#define MAX_LINES 1024

static PyObject *
parse(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *data_obj, *cache, *msg = NULL, *lines, *names, *pos, *offs, *blens, *v;
    Py_ssize_t max_line, max_headers, max_size, len, base, head_end, body_start, end;
    Py_ssize_t nlines = 0, i, route_count = 0;
    const Py_ssize_t *off;
    const char *data, *head, *limit, *p, *first_end;
    /* per header field: start and end of the line, and of the value after the colon */
    const char *ls[MAX_LINES], *le[MAX_LINES], *vs[MAX_LINES];
    Py_ssize_t idx[H_COUNT];
    int rc, stream, is_response;
    long long number, content_length = -1;

    (void)module;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "parse() takes 6 arguments");
        return NULL;
    }
    if (t_request == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "parse() before configure()");
        return NULL;
    }
    data_obj = args[0];
    cache = args[5];
    if (!PyDict_CheckExact(cache)) {
        PyErr_SetString(PyExc_TypeError, "name_cache must be a dict");
        return NULL;
    }
    stream = PyObject_IsTrue(args[1]);
    if (stream < 0) {
        return NULL;
    }
    /* Caps beyond Py_ssize_t (or not ints at all) are for the Python code to cope with. */
    max_line = PyLong_AsSsize_t(args[2]);
    max_headers = max_line == -1 && PyErr_Occurred() ? -1 : PyLong_AsSsize_t(args[3]);
    max_size = max_headers == -1 && PyErr_Occurred() ? -1 : PyLong_AsSsize_t(args[4]);
    if (max_size == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (!PyBytes_CheckExact(data_obj) || max_size < 0 || max_size > PY_SSIZE_T_MAX / 2) {
        Py_RETURN_NONE;
    }
    data = PyBytes_AS_STRING(data_obj);
    len = PyBytes_GET_SIZE(data_obj);
    for (i = 0; i < H_COUNT; i++) {
        idx[i] = -1;
    }

#define DECLINE()            \
    do {                     \
        Py_XDECREF(msg);     \
        Py_RETURN_NONE;      \
    } while (0)
#define FAIL()               \
    do {                     \
        Py_XDECREF(msg);     \
        return NULL;         \
    } while (0)
#define CHECK(expr)          \
    do {                     \
        rc = (expr);         \
        if (rc < 0) {        \
            FAIL();          \
        }                    \
        if (rc == 0) {       \
            DECLINE();       \
        }                    \
    } while (0)

    /* ---- leading CRLFs, then lines up to the first empty one: ASCII, CRLF only, no
     * folding, bounded length; the blank line within max_size + 4 bytes of base, as
     * data.find(b"\r\n\r\n", base, base + max_size + 4) in _parse. */
    base = 0;
    while (base < len && (data[base] == '\r' || data[base] == '\n')) {
        base++;
    }
    head = data + base;
    limit = data + (len - base > max_size + 4 ? base + max_size + 4 : len);
    p = head;
    first_end = NULL;
    for (;;) {
        const char *q = p;
        while (limit - q >= 8) {
            uint64_t w;
            memcpy(&w, q, 8);
            if (special_bytes(w)) {
                break;
            }
            q += 8;
        }
        while (q < limit && *q != '\r' && *q != '\n') {
            if ((unsigned char)*q >= 0x80) {
                DECLINE();
            }
            q++;
        }
        /* the line must end in CRLF inside the window; a bare CR or LF, or none: decline */
        if (limit - q < 2 || q[0] != '\r' || q[1] != '\n') {
            DECLINE();
        }
        if (q - p > max_line) {
            DECLINE();
        }
        if (first_end == NULL) {
            if (q == p) {
                DECLINE(); /* no start line (only when data was empty) */
            }
            first_end = q;
        }
        else {
            if (q == p) {
                break; /* the blank line */
            }
            if (nlines >= MAX_LINES || nlines >= max_headers) {
                DECLINE();
            }
            if (*p == ' ' || *p == '\t') {
                DECLINE(); /* folding */
            }
            ls[nlines] = p;
            le[nlines] = q;
            nlines++;
        }
        p = q + 2;
    }
    if (nlines == 0) {
        DECLINE(); /* the blank line right after the start line: no mandatory headers */
    }
    /* The blank line starts at p: the CRLF before it (ending the last header line) and its
     * own make the first "\r\n\r\n" after base, which is where _parse's find stops, since
     * every CR and LF before it ends a non-empty line. */
    head_end = (p - 2) - data;
    body_start = head_end + 4;

    /* ---- start line */
    p = head;
    if (first_end - p >= 12 && memcmp(p, "SIP/2.0 ", 8) == 0) {
        const char *c = p + 8;
        if (!(c[0] >= '1' && c[0] <= '6' && IS(c[1], C_DIGIT) && IS(c[2], C_DIGIT) &&
              c[3] == ' ')) {
            DECLINE();
        }
        is_response = 1;
        off = off_response;
        msg = new_instance(t_response);
        if (msg == NULL) {
            FAIL();
        }
        v = PyLong_FromLong((c[0] - '0') * 100 + (c[1] - '0') * 10 + (c[2] - '0'));
        if (v == NULL) {
            FAIL();
        }
        SET(msg, off[M_STATUS], v);
        v = str_of(c + 4, first_end);
        if (v == NULL) {
            FAIL();
        }
        SET(msg, off[M_REASON], v);
    }
    else {
        const char *m = p, *me, *u, *ue, *s;
        me = m;
        while (me < first_end && *me >= 'A' && *me <= 'Z') {
            me++;
        }
        if (me == m || me >= first_end || *me != ' ') {
            DECLINE();
        }
        u = me + 1;
        if (first_end - u >= 4 && memcmp(u, "sip:", 4) == 0) {
            ue = u + 4;
        }
        else if (first_end - u >= 5 && memcmp(u, "sips:", 5) == 0) {
            ue = u + 5;
        }
        else {
            DECLINE();
        }
        s = ue;
        ue = span(ue, first_end, C_RURI);
        if (ue == s || first_end - ue != 8 || memcmp(ue, " SIP/2.0", 8) != 0) {
            DECLINE();
        }
        is_response = 0;
        off = off_request;
        msg = new_instance(t_request);
        if (msg == NULL) {
            FAIL();
        }
        v = cached_str(m, me, method_text, methods_str, N_METHODS);
        if (v == NULL) {
            FAIL();
        }
        SET(msg, off[M_METHOD], v);
        v = str_of(u, ue);
        if (v == NULL) {
            FAIL();
        }
        SET(msg, off[M_URI], v);
        SET(msg, off[M_REQUEST_URI], Py_NewRef(Py_None));
    }
    /* Every slot gets a value before anything can decline after this point, so that
     * the message is always complete for its deallocator and the GC (NULL slots are fine
     * for both, but a complete object is easier to reason about). */
    SET(msg, off[M_ASCII], Py_NewRef(Py_True));
    SET(msg, off[M_TOP_VIA_TEXT], Py_NewRef(Py_None));
    SET(msg, off[M_VIAS], Py_NewRef(Py_None));
    SET(msg, off[M_RECORD_ROUTES], Py_NewRef(Py_None));
    SET(msg, off[M_CONTACTS], Py_NewRef(Py_None));

    /* ---- the index */
    lines = PyList_New(nlines);
    if (lines == NULL) {
        FAIL();
    }
    SET(msg, off[M_LINES], lines);
    names = PyList_New(nlines);
    if (names == NULL) {
        FAIL();
    }
    SET(msg, off[M_NAMES], names);
    offs = PyList_New(nlines);
    if (offs == NULL) {
        FAIL();
    }
    SET(msg, off[M_OFFS], offs);
    blens = PyList_New(nlines);
    if (blens == NULL) {
        FAIL();
    }
    SET(msg, off[M_BLENS], blens);
    pos = _PyDict_NewPresized(nlines);
    if (pos == NULL) {
        FAIL();
    }
    SET(msg, off[M_POS], pos);
    /* The lists are filled in order; until then their items are NULL, which list_dealloc
     * and list traversal accept. */
    for (i = 0; i < nlines; i++) {
        const char *colon = memchr(ls[i], ':', le[i] - ls[i]);
        PyObject *canon;
        int h;
        if (colon == NULL) {
            DECLINE();
        }
        vs[i] = colon + 1;
        canon = known_name(ls[i], colon); /* borrowed */
        if (canon == NULL) {
            PyObject *written = str_of(ls[i], colon);
            if (written == NULL) {
                FAIL();
            }
            canon = PyDict_GetItemWithError(cache, written); /* borrowed */
            Py_DECREF(written);
            if (canon == NULL) {
                if (PyErr_Occurred()) {
                    FAIL();
                }
                DECLINE(); /* a spelling not seen before: canonical_name validates it */
            }
            /* Interned, so that a canonical name equal to one of headers_str is that very
             * object (canonical_name interns all it stores). */
            if (!PyUnicode_CheckExact(canon) || !PyUnicode_CHECK_INTERNED(canon)) {
                DECLINE();
            }
        }
        v = str_of(ls[i], le[i]);
        if (v == NULL) {
            FAIL();
        }
        PyList_SET_ITEM(lines, i, v);
        PyList_SET_ITEM(names, i, Py_NewRef(canon));
        v = PyLong_FromSsize_t(ls[i] - head);
        if (v == NULL) {
            FAIL();
        }
        PyList_SET_ITEM(offs, i, v);
        v = PyLong_FromSsize_t(le[i] - ls[i]);
        if (v == NULL) {
            FAIL();
        }
        PyList_SET_ITEM(blens, i, v);
        v = PyLong_FromSsize_t(i);
        if (v == NULL) {
            FAIL();
        }
        rc = PyDict_SetItem(pos, canon, v);
        Py_DECREF(v);
        if (rc < 0) {
            FAIL();
        }
        for (h = 0; h < H_COUNT; h++) {
            if (canon == headers_str[h]) {
                break;
            }
        }
        switch (h) {
        case H_VIA:
            if (idx[h] < 0) {
                idx[h] = i; /* the first Via field */
            }
            break;
        case H_ROUTE:
            idx[h] = i;
            route_count++;
            break;
        case H_COUNT:
            break;
        default: /* the singletons */
            if (idx[h] >= 0) {
                DECLINE();
            }
            idx[h] = i;
            break;
        }
    }
    if (idx[H_TO] < 0 || idx[H_FROM] < 0 || idx[H_CALL_ID] < 0 || idx[H_CSEQ] < 0 ||
        idx[H_VIA] < 0) {
        DECLINE();
    }
    v = PyLong_FromSsize_t(first_end - head);
    if (v == NULL) {
        FAIL();
    }
    SET(msg, off[M_START_BLEN], v);

    /* ---- the values every message is checked for */
    CHECK(parse_call_id(vs[idx[H_CALL_ID]], le[idx[H_CALL_ID]], &v));
    SET(msg, off[M_CALL_ID], v);
    CHECK(parse_cseq(vs[idx[H_CSEQ]], le[idx[H_CSEQ]],
                     is_response ? NULL : *(PyObject **)((char *)msg + off[M_METHOD]), &v));
    SET(msg, off[M_CSEQ], v);
    CHECK(parse_via(vs[idx[H_VIA]], le[idx[H_VIA]], &v));
    SET(msg, off[M_TOP_VIA], v);
    CHECK(parse_from_to(vs[idx[H_FROM]], le[idx[H_FROM]], &v));
    SET(msg, off[M_FROM], v);
    CHECK(parse_from_to(vs[idx[H_TO]], le[idx[H_TO]], &v));
    SET(msg, off[M_TO], v);
    if (idx[H_MAX_FORWARDS] >= 0) {
        CHECK(parse_digits(vs[idx[H_MAX_FORWARDS]], le[idx[H_MAX_FORWARDS]], 10, &number));
        if (number > 255) {
            DECLINE();
        }
        v = PyLong_FromLongLong(number);
        if (v == NULL) {
            FAIL();
        }
    }
    else {
        v = Py_NewRef(Py_None);
    }
    SET(msg, off[M_MAX_FORWARDS], v);
    if (idx[H_CONTENT_LENGTH] >= 0) {
        CHECK(parse_digits(vs[idx[H_CONTENT_LENGTH]], le[idx[H_CONTENT_LENGTH]], 10,
                           &content_length));
    }

    /* ---- body (_set_body; every error there is a decline) */
    if (content_length >= 0) {
        if (body_start - base + content_length > max_size || content_length > len - body_start ||
            (stream && content_length != len - body_start)) {
            DECLINE();
        }
        end = body_start + (Py_ssize_t)content_length;
    }
    else {
        if (stream || len - base > max_size) {
            DECLINE();
        }
        end = len;
    }
    v = (base == 0 && end == len) ? Py_NewRef(data_obj)
                                  : PyBytes_FromStringAndSize(data + base, end - base);
    if (v == NULL) {
        FAIL();
    }
    SET(msg, off[M_RAW], v);
    v = PyBytes_FromStringAndSize(data + body_start, end - body_start);
    if (v == NULL) {
        FAIL();
    }
    SET(msg, off[M_BODY], v);
    v = PyLong_FromSsize_t(body_start - base);
    if (v == NULL) {
        FAIL();
    }
    SET(msg, off[M_BODY_OFFSET], v);

    /* ---- a lone Route field with one <URI> value: what SipMessage.routes would cache */
    v = NULL;
    if (route_count == 1) {
        rc = parse_name_addr(vs[idx[H_ROUTE]], le[idx[H_ROUTE]], &v);
        if (rc < 0) {
            FAIL();
        }
        if (rc > 0) {
            PyObject *list = PyList_New(1);
            if (list == NULL) {
                Py_DECREF(v);
                FAIL();
            }
            PyList_SET_ITEM(list, 0, v);
            v = list;
        }
        else {
            v = NULL;
        }
    }
    SET(msg, off[M_ROUTES], v != NULL ? v : Py_NewRef(Py_None));
    return msg;
#undef DECLINE
#undef FAIL
#undef CHECK
}

/* ------------------------------------------------------------------ splicing */

typedef struct {
    Py_ssize_t start, end, order;
    const char *text;
    Py_ssize_t len;
} edit_t;

static int
edit_cmp(const void *a, const void *b)
{
    const edit_t *x = a, *y = b;
    if (x->start != y->start) {
        return x->start < y->start ? -1 : 1;
    }
    if (x->end != y->end) {
        return x->end < y->end ? -1 : 1;
    }
    return x->order < y->order ? -1 : (x->order > y->order);
}

/* splice(raw, edits) -> bytes | None: SipMessage._splice in one allocation.  edits is a
 * list of (start, end, replacement) tuples, applied in (start, end) order, equal spans in
 * their given order (the stable sort _splice does); the list itself is not changed.  None
 * -- "do it in Python" -- for anything but exact bytes/list/tuple/int arguments forming
 * non-overlapping spans inside raw, so that the result always equals _splice's. */
static PyObject *
splice(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *raw, *list, *out;
    edit_t small[16], *e;
    Py_ssize_t n, i, len, total, pos, removed = 0, added = 0;
    char *o;
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "splice() takes 2 arguments");
        return NULL;
    }
    raw = args[0];
    list = args[1];
    if (!PyBytes_CheckExact(raw) || !PyList_CheckExact(list)) {
        Py_RETURN_NONE;
    }
    len = PyBytes_GET_SIZE(raw);
    n = PyList_GET_SIZE(list);
    if (n > (Py_ssize_t)(PY_SSIZE_T_MAX / sizeof(edit_t))) {
        Py_RETURN_NONE;
    }
    e = n <= 16 ? small : PyMem_Malloc(n * sizeof(edit_t));
    if (e == NULL) {
        return PyErr_NoMemory();
    }
    out = Py_None;
    for (i = 0; i < n; i++) {
        PyObject *t = PyList_GET_ITEM(list, i), *a, *b, *c;
        if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) != 3) {
            goto done;
        }
        a = PyTuple_GET_ITEM(t, 0);
        b = PyTuple_GET_ITEM(t, 1);
        c = PyTuple_GET_ITEM(t, 2);
        if (!PyLong_CheckExact(a) || !PyLong_CheckExact(b) || !PyBytes_CheckExact(c)) {
            goto done;
        }
        e[i].start = PyLong_AsSsize_t(a);
        e[i].end = PyLong_AsSsize_t(b);
        if (PyErr_Occurred()) {
            PyErr_Clear(); /* beyond Py_ssize_t: not a span of raw */
            goto done;
        }
        if (e[i].start < 0 || e[i].start > e[i].end || e[i].end > len) {
            goto done;
        }
        e[i].order = i;
        e[i].text = PyBytes_AS_STRING(c);
        e[i].len = PyBytes_GET_SIZE(c);
        /* Non-overlapping spans remove at most len bytes in all; more means overlap. */
        removed += e[i].end - e[i].start;
        if (removed > len || e[i].len > PY_SSIZE_T_MAX - len - added) {
            goto done;
        }
        added += e[i].len;
    }
    total = len - removed + added;
    if (n > 1) {
        qsort(e, n, sizeof(edit_t), edit_cmp);
    }
    for (i = 1; i < n; i++) {
        if (e[i].start < e[i - 1].end) {
            goto done; /* overlapping */
        }
    }
    out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL) {
        goto done;
    }
    o = PyBytes_AS_STRING(out);
    pos = 0;
    for (i = 0; i < n; i++) {
        memcpy(o, PyBytes_AS_STRING(raw) + pos, e[i].start - pos);
        o += e[i].start - pos;
        memcpy(o, e[i].text, e[i].len);
        o += e[i].len;
        pos = e[i].end;
    }
    memcpy(o, PyBytes_AS_STRING(raw) + pos, len - pos);
done:
    if (e != small) {
        PyMem_Free(e);
    }
    return out == Py_None ? Py_NewRef(Py_None) : out;
}

static PyObject *
known_names(PyObject *module, PyObject *unused)
{
    PyObject *out = PyDict_New();
    int k;
    (void)module;
    (void)unused;
    if (out == NULL) {
        return NULL;
    }
    for (k = 0; k < N_NAMES; k++) {
        PyObject *key = PyUnicode_FromString(name_table[k][0]);
        if (key == NULL || PyDict_SetItem(out, key, name_canon[k]) < 0) {
            Py_XDECREF(key);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(key);
    }
    return out;
}

/* respond(req, status, reason, to_tag, headers, body) -> bytes | None: what
 * sipcore.message.build_response returns for a request parse() built (or one of its class)
 * with an ASCII head, or None to leave it to the Python code.  It declines -- so every
 * ValueError stays Python's -- anything but: status an int, reason / to_tag (or None) /
 * header names and values ASCII str without CR or LF, header names tokens, headers a list
 * or tuple of 2-tuples, body bytes, and copied lines ASCII.  When the top Via was rewritten
 * by stamp_received, its field must hold one value (no comma, quote, "<" or fold), which is
 * replaced as SipMessage._stamped_via_line does: after the colon and blanks, up to the
 * trailing blanks. */
#define R_GROUPS 6 /* via, from, to, call-id, cseq, timestamp (for a 100 only) */
static const char *const r_group_text[R_GROUPS] = {
    "via", "from", "to", "call-id", "cseq", "timestamp",
};

static int
ascii_eq(PyObject *u, const char *text)
{
    size_t n = strlen(text);
    return PyUnicode_IS_ASCII(u) && (size_t)PyUnicode_GET_LENGTH(u) == n &&
           memcmp(PyUnicode_DATA(u), text, n) == 0;
}

/* An ASCII str without CR or LF (what may be written into a header). */
static int
clean_text(PyObject *u)
{
    const char *p, *end;
    if (!PyUnicode_CheckExact(u) || !PyUnicode_IS_ASCII(u)) {
        return 0;
    }
    p = (const char *)PyUnicode_DATA(u);
    end = p + PyUnicode_GET_LENGTH(u);
    for (; p < end; p++) {
        if (*p == '\r' || *p == '\n') {
            return 0;
        }
    }
    return 1;
}

/* A header name (a token) that build_response replaces by the real Content-Length: the
 * long form in any case, or the compact "l" / "L". */
static int
is_content_length(const char *q, Py_ssize_t len)
{
    return (len == 1 && (q[0] == 'l' || q[0] == 'L')) ||
           (len == 14 && PyOS_strnicmp(q, "content-length", 14) == 0);
}

static PyObject *
respond(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *req, *reason, *to_tag, *headers, *body, *names, *lines, *via_text, *to;
    PyObject *extra = NULL, *out;
    Py_ssize_t n_lines, k, size, via_start = 0, via_end = 0, via_line = -1, to_line = -1;
    Py_ssize_t n_extra, body_len;
    long status;
    int groups, add_tag = 0;
    char head[64], tail[48], *w;
    int head_len, tail_len;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "respond() takes 6 arguments");
        return NULL;
    }
    if (t_request == NULL) {
        Py_RETURN_NONE;
    }
    req = args[0];
    reason = args[2];
    to_tag = args[3];
    headers = args[4];
    body = args[5];
    if (!PyObject_TypeCheck(req, t_request) || !PyLong_CheckExact(args[1]) ||
        !clean_text(reason) || (to_tag != Py_None && !clean_text(to_tag)) ||
        !PyBytes_CheckExact(body) || !(PyList_CheckExact(headers) || PyTuple_CheckExact(headers))) {
        Py_RETURN_NONE;
    }
    status = PyLong_AsLong(args[1]);
    if (status < 100 || status > 699) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    names = *(PyObject **)((char *)req + off_request[M_NAMES]);
    lines = *(PyObject **)((char *)req + off_request[M_LINES]);
    via_text = *(PyObject **)((char *)req + off_request[M_TOP_VIA_TEXT]);
    to = *(PyObject **)((char *)req + off_request[M_TO]);
    if (names == NULL || lines == NULL || !PyList_CheckExact(names) ||
        !PyList_CheckExact(lines) || PyList_GET_SIZE(names) != PyList_GET_SIZE(lines) ||
        to == NULL || !PyObject_TypeCheck(to, t_name_addr)) {
        Py_RETURN_NONE;
    }
    if (via_text != NULL && via_text != Py_None && !clean_text(via_text)) {
        Py_RETURN_NONE;
    }
    if (to_tag != Py_None && status > 100) {
        PyObject *params = *(PyObject **)((char *)to + off_na[N_PARAMS]);
        PyObject *tag;
        if (params == NULL || !PyDict_CheckExact(params)) {
            Py_RETURN_NONE;
        }
        tag = PyDict_GetItemString(params, "tag"); /* borrowed; no error for a str key */
        add_tag = tag == NULL || tag == Py_None;
    }
    groups = status == 100 ? R_GROUPS : R_GROUPS - 1;
    n_lines = PyList_GET_SIZE(lines);

    /* Sizes first: the status line, the copied lines, the extra headers, Content-Length. */
    head_len = snprintf(head, sizeof head, "SIP/2.0 %ld ", status);
    size = head_len + PyUnicode_GET_LENGTH(reason) + 2;
    for (k = 0; k < n_lines; k++) {
        PyObject *name = PyList_GET_ITEM(names, k), *line = PyList_GET_ITEM(lines, k);
        int g;
        if (!PyUnicode_Check(name)) {
            Py_RETURN_NONE;
        }
        for (g = 0; g < groups; g++) {
            if (ascii_eq(name, r_group_text[g])) {
                break;
            }
        }
        if (g == groups) {
            continue;
        }
        if (!PyUnicode_CheckExact(line) || !PyUnicode_IS_ASCII(line)) {
            Py_RETURN_NONE;
        }
        size += PyUnicode_GET_LENGTH(line) + 2;
        if (g == 0 && via_line < 0) {
            via_line = k;
        } else if (g == 2 && to_line < 0) {
            to_line = k;
        }
    }
    if (via_line < 0 || to_line < 0) {
        Py_RETURN_NONE;
    }
    if (via_text != NULL && via_text != Py_None) {
        PyObject *line = PyList_GET_ITEM(lines, via_line);
        const char *p = (const char *)PyUnicode_DATA(line);
        Py_ssize_t n = PyUnicode_GET_LENGTH(line), c;
        const char *colon = memchr(p, ':', (size_t)n);
        for (c = 0; c < n; c++) {
            if (p[c] == ',' || p[c] == '"' || p[c] == '<' || p[c] == '\r' || p[c] == '\n') {
                Py_RETURN_NONE;
            }
        }
        if (colon == NULL) {
            Py_RETURN_NONE;
        }
        via_start = colon - p + 1;
        while (via_start < n && (p[via_start] == ' ' || p[via_start] == '\t')) {
            via_start++;
        }
        via_end = n;
        while (via_end > via_start && (p[via_end - 1] == ' ' || p[via_end - 1] == '\t')) {
            via_end--;
        }
        if (via_end == via_start) {
            Py_RETURN_NONE;
        }
        size += PyUnicode_GET_LENGTH(via_text) - (via_end - via_start);
    }
    if (add_tag) {
        size += 5 + PyUnicode_GET_LENGTH(to_tag);
    }
    extra = PySequence_Fast(headers, "headers");
    if (extra == NULL) {
        return NULL;
    }
    n_extra = PySequence_Fast_GET_SIZE(extra);
    for (k = 0; k < n_extra; k++) {
        PyObject *item = PySequence_Fast_GET_ITEM(extra, k), *name, *value;
        const char *q;
        Py_ssize_t len, j;
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2) {
            goto decline;
        }
        name = PyTuple_GET_ITEM(item, 0);
        value = PyTuple_GET_ITEM(item, 1);
        if (!clean_text(name) || !clean_text(value)) {
            goto decline;
        }
        q = (const char *)PyUnicode_DATA(name);
        len = PyUnicode_GET_LENGTH(name);
        if (len == 0) {
            goto decline;
        }
        for (j = 0; j < len; j++) {
            if (!IS(q[j], C_TOKEN)) {
                goto decline;
            }
        }
        if (is_content_length(q, len)) {
            continue; /* replaced by the real one */
        }
        size += len + 2 + PyUnicode_GET_LENGTH(value) + 2;
    }
    body_len = PyBytes_GET_SIZE(body);
    tail_len = snprintf(tail, sizeof tail, "Content-Length: %zd\r\n\r\n", body_len);
    size += tail_len + body_len;

    out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL) {
        Py_DECREF(extra);
        return NULL;
    }
    w = PyBytes_AS_STRING(out);
#define PUT(src, len) (memcpy(w, (src), (size_t)(len)), w += (len))
#define PUT_STR(u) PUT(PyUnicode_DATA(u), PyUnicode_GET_LENGTH(u))
    PUT(head, head_len);
    PUT_STR(reason);
    PUT("\r\n", 2);
    {
        int g;
        /* The groups in RFC order, each in message order (build_response's by_name). */
        for (g = 0; g < groups; g++) {
            for (k = 0; k < n_lines; k++) {
                PyObject *line = PyList_GET_ITEM(lines, k);
                if (!ascii_eq(PyList_GET_ITEM(names, k), r_group_text[g])) {
                    continue;
                }
                if (k == via_line && via_text != NULL && via_text != Py_None) {
                    const char *p = (const char *)PyUnicode_DATA(line);
                    PUT(p, via_start);
                    PUT_STR(via_text);
                    PUT(p + via_end, PyUnicode_GET_LENGTH(line) - via_end);
                } else {
                    PUT_STR(line);
                }
                if (k == to_line && add_tag) {
                    PUT(";tag=", 5);
                    PUT_STR(to_tag);
                }
                PUT("\r\n", 2);
            }
        }
    }
    for (k = 0; k < n_extra; k++) {
        PyObject *item = PySequence_Fast_GET_ITEM(extra, k);
        PyObject *name = PyTuple_GET_ITEM(item, 0);
        const char *q = (const char *)PyUnicode_DATA(name);
        Py_ssize_t len = PyUnicode_GET_LENGTH(name);
        if (is_content_length(q, len)) {
            continue;
        }
        PUT_STR(name);
        PUT(": ", 2);
        PUT_STR(PyTuple_GET_ITEM(item, 1));
        PUT("\r\n", 2);
    }
    PUT(tail, tail_len);
    PUT(PyBytes_AS_STRING(body), body_len);
#undef PUT_STR
#undef PUT
    Py_DECREF(extra);
    if (w != PyBytes_AS_STRING(out) + size) { /* cannot happen: the sizes above are exact */
        Py_DECREF(out);
        PyErr_SetString(PyExc_SystemError, "respond(): size mismatch");
        return NULL;
    }
    return out;
decline:
    Py_DECREF(extra);
    Py_RETURN_NONE;
}

/* auth_params(value) -> (scheme, {name: value}) | None: sipcore.digest._parse_auth_header for
 * an Authorization / WWW-Authenticate value in the common shape, or None to leave it to the
 * Python code.  It accepts a subset of what _SCHEME_RE and _PARAM_RE accept: printable ASCII
 * only (no HTAB, no control, nothing that needs a verdict), no backslash (so no quoted-pair),
 *   SP* token (SP+ | end)  then  ( [SP,]* token SP* "=" SP* ("[^"]*" | bare) SP* ("," | end) )*
 *   and trailing [SP,]*,
 * with bare = [\x21\x23-\x2b\x2d-\x7e]+ and each name (lower-cased) at most once.  Anything
 * else -- including every malformed value -- is declined, so each error stays Python's. */
static PyObject *
auth_params(PyObject *self, PyObject *value)
{
    const char *p, *end, *q;
    Py_ssize_t n;
    PyObject *params, *scheme, *key, *val, *out;
    char name[64];
    if (!PyUnicode_Check(value) || !PyUnicode_IS_ASCII(value)) {
        Py_RETURN_NONE;
    }
    p = (const char *)PyUnicode_DATA(value);
    n = PyUnicode_GET_LENGTH(value);
    end = p + n;
    for (q = p; q < end; q++) {
        if (*q < 0x20 || *q > 0x7e || *q == '\\') {
            Py_RETURN_NONE;
        }
    }
    while (p < end && *p == ' ') {
        p++;
    }
    q = span(p, end, C_TOKEN);
    if (q == p || (q < end && *q != ' ')) {
        Py_RETURN_NONE;
    }
    scheme = PyUnicode_FromStringAndSize(p, q - p);
    if (scheme == NULL) {
        return NULL;
    }
    params = PyDict_New();
    if (params == NULL) {
        Py_DECREF(scheme);
        return NULL;
    }
    p = q;
    for (;;) {
        const char *vs, *ve;
        Py_ssize_t k, len;
        int r;
        while (p < end && (*p == ' ' || *p == ',')) {
            p++;
        }
        if (p == end) {
            break;
        }
        q = span(p, end, C_TOKEN);
        len = q - p;
        if (len == 0 || len >= (Py_ssize_t)sizeof(name)) {
            goto decline;
        }
        for (k = 0; k < len; k++) {
            char c = p[k];
            name[k] = (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
        }
        p = q;
        while (p < end && *p == ' ') {
            p++;
        }
        if (p == end || *p != '=') {
            goto decline;
        }
        p++;
        while (p < end && *p == ' ') {
            p++;
        }
        if (p < end && *p == '"') {
            vs = ++p;
            while (p < end && *p != '"') {
                p++;
            }
            if (p == end) {
                goto decline;
            }
            ve = p++;
        } else {
            vs = p;
            while (p < end && *p > ' ' && *p != '"' && *p != ',') {
                p++;
            }
            ve = p;
            if (ve == vs) {
                goto decline;
            }
        }
        while (p < end && *p == ' ') {
            p++;
        }
        if (p < end && *p != ',') {
            goto decline;
        }
        key = PyUnicode_FromStringAndSize(name, len);
        if (key == NULL) {
            goto error;
        }
        r = PyDict_Contains(params, key);
        if (r != 0) {
            Py_DECREF(key);
            if (r < 0) {
                goto error;
            }
            goto decline; /* repeated: Python's error */
        }
        val = PyUnicode_FromStringAndSize(vs, ve - vs);
        if (val == NULL) {
            Py_DECREF(key);
            goto error;
        }
        r = PyDict_SetItem(params, key, val);
        Py_DECREF(key);
        Py_DECREF(val);
        if (r < 0) {
            goto error;
        }
    }
    out = PyTuple_Pack(2, scheme, params);
    Py_DECREF(scheme);
    Py_DECREF(params);
    return out;
decline:
    Py_DECREF(scheme);
    Py_DECREF(params);
    Py_RETURN_NONE;
error:
    Py_DECREF(scheme);
    Py_DECREF(params);
    return NULL;
}

static PyMethodDef methods[] = {
    {"auth_params", auth_params, METH_O,
     "auth_params(value) -> (scheme, params) | None: digest._parse_auth_header, or None"},
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL,
     "configure(Request, Response, Via, NameAddr, CSeq): the classes parse() builds"},
    {"known_names", known_names, METH_NOARGS,
     "known_names() -> dict: the built-in header name table (written -> canonical)"},
    {"parse", (PyCFunction)(void (*)(void))parse, METH_FASTCALL,
     "parse(data, stream, max_line, max_headers, max_size, name_cache) "
     "-> Request | Response | None"},
    {"respond", (PyCFunction)(void (*)(void))respond, METH_FASTCALL,
     "respond(req, status, reason, to_tag, headers, body) -> bytes | None: build_response"},
    {"splice", (PyCFunction)(void (*)(void))splice, METH_FASTCALL,
     "splice(raw, edits) -> bytes | None: SipMessage._splice, or None to do it in Python"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "sipcore._fastparse",
    "Optional C accelerator for sipcore.message (see _fastparse.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

static int
intern_all(const char *const *text, PyObject **out, int n)
{
    int k;
    for (k = 0; k < n; k++) {
        out[k] = PyUnicode_InternFromString(text[k]);
        if (out[k] == NULL) {
            return -1;
        }
    }
    return 0;
}

PyMODINIT_FUNC
PyInit__fastparse(void)
{
    PyObject *m;
    int k;
    init_classes();
    if (intern_all(key_text, keys, K_COUNT) < 0 ||
        intern_all(method_text, methods_str, N_METHODS) < 0 ||
        intern_all(transport_text, transports_str, N_TRANSPORTS) < 0 ||
        intern_all(header_text, headers_str, H_COUNT) < 0) {
        return NULL;
    }
    for (k = 0; k < K_COUNT; k++) {
        key_len[k] = (Py_ssize_t)strlen(key_text[k]);
    }
    sip_2_0 = PyUnicode_InternFromString("SIP/2.0");
    if (sip_2_0 == NULL) {
        return NULL;
    }
    memset(name_slot, -1, sizeof(name_slot));
    for (k = 0; k < N_NAMES; k++) {
        unsigned int h;
        name_canon[k] = PyUnicode_InternFromString(name_table[k][1]);
        if (name_canon[k] == NULL) {
            return NULL;
        }
        name_len[k] = (Py_ssize_t)strlen(name_table[k][0]);
        h = name_hash(name_table[k][0], name_len[k]) & (NAME_SLOTS - 1);
        while (name_slot[h] >= 0) {
            h = (h + 1) & (NAME_SLOTS - 1);
        }
        name_slot[h] = (signed char)k;
    }
    m = PyModule_Create(&moduledef);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddStringConstant(m, "SOURCE_HASH", SOURCE_HASH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
