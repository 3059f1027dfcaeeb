/* Optional accelerator for sipcore.message: recognise the common shape of a SIP header block.
 *
 * scan(data, base, head_end, max_line, max_headers, name_cache) looks at the header block
 * data[base:head_end] and either returns None -- "not the common shape, use the pure-Python
 * parser" -- or everything sipcore.message._parse would have computed for it.  It never
 * rejects anything and never raises for bad input: every verdict (400, 505, 513, ...) stays
 * with the Python code, which sees every message this function declines.  So all it has to
 * guarantee is that for the messages it accepts, its result equals the pure-Python one;
 * tests/sipcore/test_fastparse.py compares the two on the RFC 4475 messages and on
 * generated and mutated ones.
 *
 * What it accepts is a subset of what the regex fast paths in sipcore.headers and
 * sipcore.message accept (same grammar, written out by hand):
 *   - ASCII only; every CR and LF part of a CRLF; no line longer than max_line; no folding;
 *   - Request-Line  [A-Z]+ SP sips?:[!#-;=@-~]+ SP SIP/2.0
 *     Status-Line   SIP/2.0 SP [1-6][0-9][0-9] SP reason;
 *   - every header name as written (up to its colon) already in name_cache
 *     (sipcore.headers._NAME_CACHE), at most max_headers fields;
 *   - To, From, Call-ID, CSeq, Via present, the singletons not repeated, and the values of
 *     Call-ID, CSeq (< 10 digits, method equal to the request's), the first Via field (one
 *     value, no typed parameter that needs checking), From, To (<URI> forms, no bare ;tag),
 *     Max-Forwards (<= 255) and Content-Length in the shapes of _CALL_ID_VALUE, _CSEQ_VALUE,
 *     _VIA_VALUE, _NAME_ADDR_VALUE and _DIGITS_VALUE.
 *
 * The result tuple (see _FAST_FIELDS in sipcore/message.py for the names):
 *   (is_response, method | status, uri | reason, lines, names, pos, offs, blens,
 *    call_id, cseq_number, cseq_method,
 *    via_transport, via_host, via_port, via_params,
 *    from_display, from_uri, from_params, to_display, to_uri, to_params,
 *    max_forwards, content_length)
 * offs/blens are byte offsets (from base) and lengths of the header fields, as
 * SipMessage._offsets computes them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

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

/* Interned strs: header and parameter names the parser compares or stores often (their
 * hashes are computed once). */
enum {
    K_TAG,
    K_BRANCH,
    K_RPORT,
    K_RECEIVED,
    K_MADDR,
    K_TTL,
    K_LR,
    K_TRANSPORT,
    K_COUNT
};
static const char *const key_text[K_COUNT] = {
    "tag", "branch", "rport", "received", "maddr", "ttl", "lr", "transport",
};
static PyObject *keys[K_COUNT];

/* Header names as commonly written -> canonical name: the entries sipcore.headers puts in
 * _NAME_CACHE before any message is seen (known_names() returns this table so a test can
 * check that).  A name not here is looked up in the cache passed to scan(). */
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
#define N_NAMES ((Py_ssize_t)(sizeof(name_table) / sizeof(name_table[0])))
static PyObject *name_canon[N_NAMES];
static Py_ssize_t name_len[N_NAMES];

/* Canonical name (borrowed) for the name written as [p, end), from the table, else NULL. */
static PyObject *
known_name(const char *p, const char *end)
{
    Py_ssize_t n = end - p, k;
    for (k = 0; k < N_NAMES; k++) {
        if (name_len[k] == n && name_table[k][0][0] == *p && memcmp(name_table[k][0], p, n) == 0) {
            return name_canon[k];
        }
    }
    return NULL;
}

/* The interned parameter name equal to lower([p, end)), or a new str. */
static PyObject *
param_key(const char *p, const char *end);

/* A lower-cased copy of [p, end) as str (ASCII). */
static PyObject *
lower_str(const char *p, const char *end)
{
    Py_ssize_t n = end - p, i;
    PyObject *s = PyUnicode_New(n, 127);
    Py_UCS1 *out;
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

static PyObject *
param_key(const char *p, const char *end)
{
    Py_ssize_t n = end - p;
    int k;
    for (k = 0; k < K_COUNT; k++) {
        const char *t = key_text[k];
        Py_ssize_t i;
        if ((Py_ssize_t)strlen(t) != n) {
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
    return lower_str(p, end);
}

/* Digits [p, end), at most 10 of them (callers check), as an int. */
static long long
digits_value(const char *p, const char *end)
{
    long long v = 0;
    for (; p < end; p++) {
        v = v * 10 + (*p - '0');
    }
    return v;
}

/* Status of the helpers: 1 matched, 0 not the common shape, -1 Python error set. */

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

/* _CSEQ_VALUE with fewer than 10 digits: [ \t]* digits [ \t]+ token [ \t]* */
static int
parse_cseq(const char *p, const char *end, PyObject **num, PyObject **method)
{
    const char *d, *m, *q;
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
    *num = PyLong_FromLongLong(digits_value(p, d));
    if (*num == NULL) {
        return -1;
    }
    *method = str_of(m, q);
    return *method == NULL ? -1 : 1;
}

/* ;name[=value] pieces of a Via (_VIA_FAST: no LWS, values gen-value chars), into a dict
 * with lower-cased names -- what sipcore.headers._via_from_match builds. */
static int
parse_via_params(const char *p, const char *end, PyObject *params)
{
    while (p < end) {
        const char *n, *ne, *v, *ve;
        PyObject *key, *value;
        int rc;
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
        key = param_key(n, ne);
        if (key == NULL) {
            return -1;
        }
        if (v != NULL) {
            value = str_of(v, ve);
            if (value == NULL) {
                Py_DECREF(key);
                return -1;
            }
        }
        else {
            value = Py_NewRef(Py_None);
        }
        rc = PyDict_SetItem(params, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (rc < 0) {
            return -1;
        }
    }
    return 1;
}

/* _VIA_VALUE: [ \t]* SIP/2.0/transport SP host [":" port] params [ \t]* */
static int
parse_via(const char *p, const char *end, PyObject **transport, PyObject **host,
          PyObject **port, PyObject **params)
{
    const char *t, *te, *h, *he, *q;
    int rc;
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
    *port = NULL;
    if (q < end && *q == ':') {
        const char *d = span(q + 1, end, C_DIGIT);
        long long value;
        if (d == q + 1 || d - (q + 1) > 5) {
            return 0;
        }
        value = digits_value(q + 1, d);
        if (value > 65535) {
            return 0;
        }
        *port = PyLong_FromLongLong(value);
        if (*port == NULL) {
            return -1;
        }
        q = d;
    }
    else {
        *port = Py_NewRef(Py_None);
    }
    *params = PyDict_New();
    if (*params == NULL) {
        return -1;
    }
    rc = parse_via_params(q, end, *params);
    if (rc <= 0) {
        return rc;
    }
    /* The typed parameters _via_from_match hands to _check_via_params: leave them to it. */
    {
        PyObject *v;
        v = PyDict_GetItemWithError(*params, keys[K_RPORT]);
        if (v != NULL && v != Py_None) {
            return 0;
        }
        if (PyDict_GetItemWithError(*params, keys[K_TTL]) != NULL) {
            return 0;
        }
        if (PyDict_GetItemWithError(*params, keys[K_BRANCH]) == Py_None ||
            PyDict_GetItemWithError(*params, keys[K_RECEIVED]) == Py_None ||
            PyDict_GetItemWithError(*params, keys[K_MADDR]) == Py_None) {
            return 0;
        }
    }
    *transport = PyUnicode_New(te - t, 127);
    if (*transport == NULL) {
        return -1;
    }
    {
        Py_UCS1 *out = PyUnicode_1BYTE_DATA(*transport);
        Py_ssize_t i;
        for (i = 0; i < te - t; i++) {
            unsigned char c = (unsigned char)t[i];
            out[i] = (c >= 'a' && c <= 'z') ? (Py_UCS1)(c - 32) : (Py_UCS1)c;
        }
    }
    *host = str_of(h, he);
    return *host == NULL ? -1 : 1;
}

/* _PARAMS_FAST, as _fast_params reads it:
 * ( [ \t]* ";" [ \t]* token ( [ \t]* "=" [ \t]* (gen-value | "[^"\\;]*") )? )* [ \t]* */
static int
parse_header_params(const char *p, const char *end, PyObject *params)
{
    for (;;) {
        const char *n, *ne, *v = NULL, *ve = NULL;
        PyObject *key, *value;
        int rc;
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
        key = param_key(n, ne);
        if (key == NULL) {
            return -1;
        }
        if (v != NULL) {
            value = str_of(v, ve);
            if (value == NULL) {
                Py_DECREF(key);
                return -1;
            }
        }
        else {
            value = Py_NewRef(Py_None);
        }
        rc = PyDict_SetItem(params, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (rc < 0) {
            return -1;
        }
    }
}

/* _NAME_ADDR_VALUE: [ \t]* ( "display" [ \t]* | token ([ \t]+ token)* [ \t]* )?
 *                   "<" scheme ":" [^<>" \t]+ ">" params
 * Display names with anything but printable ASCII, and URIs with control characters, are
 * left to Python (a subset of what the regex takes). */
static int
parse_name_addr(const char *p, const char *end, PyObject **display, PyObject **uri,
                PyObject **params)
{
    const char *u, *ue, *q;
    int rc;
    p = skip_ws(p, end);
    *display = NULL;
    if (p < end && *p == '"') {
        q = p + 1;
        while (q < end && *q != '"' && *q != '\\' && *q >= 0x20 && *q < 0x7f) {
            q++;
        }
        if (q >= end || *q != '"') {
            return 0;
        }
        *display = str_of(p + 1, q);
        if (*display == NULL) {
            return -1;
        }
        p = skip_ws(q + 1, end);
    }
    else if (p < end && IS(*p, C_TOKEN)) {
        /* token words separated by LWS; joined by single spaces, as _name_addr_from_match */
        char buf[256];
        Py_ssize_t n = 0;
        q = p;
        for (;;) {
            const char *w = q, *we = span(q, end, C_TOKEN);
            if (we == w) {
                break;
            }
            if (n + (we - w) + 1 > (Py_ssize_t)sizeof(buf)) {
                return 0;
            }
            if (n > 0) {
                buf[n++] = ' ';
            }
            memcpy(buf + n, w, we - w);
            n += we - w;
            q = skip_ws(we, end);
        }
        *display = PyUnicode_DecodeASCII(buf, n, NULL);
        if (*display == NULL) {
            return -1;
        }
        p = q;
    }
    else {
        *display = Py_NewRef(Py_None);
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
    *uri = str_of(u, ue);
    if (*uri == NULL) {
        return -1;
    }
    *params = PyDict_New();
    if (*params == NULL) {
        return -1;
    }
    rc = parse_header_params(ue + 1, end, *params);
    if (rc <= 0) {
        return rc;
    }
    /* tag-param without a value: _parse raises; leave it to Python. */
    if (PyDict_GetItemWithError(*params, keys[K_TAG]) == Py_None) {
        return 0;
    }
    return 1;
}

static int
line_is(PyObject *name, const char *canon)
{
    return PyUnicode_CompareWithASCIIString(name, canon) == 0;
}

enum {
    F_IS_RESPONSE,
    F_A,
    F_B,
    F_LINES,
    F_NAMES,
    F_POS,
    F_OFFS,
    F_BLENS,
    F_CALL_ID,
    F_CSEQ_NUMBER,
    F_CSEQ_METHOD,
    F_VIA_TRANSPORT,
    F_VIA_HOST,
    F_VIA_PORT,
    F_VIA_PARAMS,
    F_FROM_DISPLAY,
    F_FROM_URI,
    F_FROM_PARAMS,
    F_TO_DISPLAY,
    F_TO_URI,
    F_TO_PARAMS,
    F_MAX_FORWARDS,
    F_CONTENT_LENGTH,
    F_COUNT
};

#define MAX_LINES 1024

static PyObject *
scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t base, head_end, max_line, max_headers;
    PyObject *cache;
    PyObject *f[F_COUNT] = {NULL};
    PyObject *result = NULL;
    const char *data, *head, *hend, *p, *first_end;
    /* per header field: start and end of the line, and of the value after the colon */
    const char *ls[MAX_LINES], *le[MAX_LINES], *vs[MAX_LINES];
    Py_ssize_t nlines = 0, i;
    Py_ssize_t idx_call_id = -1, idx_cseq = -1, idx_via = -1, idx_from = -1, idx_to = -1,
               idx_mf = -1, idx_cl = -1;
    int rc, declined = 0, is_response;
    long long number;

    (void)module;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "scan() takes 6 arguments");
        return NULL;
    }
    if (!PyDict_CheckExact(args[5])) {
        PyErr_SetString(PyExc_TypeError, "name_cache must be a dict");
        return NULL;
    }
    cache = args[5];
    base = PyLong_AsSsize_t(args[1]);
    head_end = PyLong_AsSsize_t(args[2]);
    max_line = PyLong_AsSsize_t(args[3]);
    max_headers = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    data = (const char *)view.buf;
    if (base < 0 || head_end < base || head_end > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "bad header block bounds");
        return NULL;
    }
    head = data + base;
    hend = data + head_end;

#define DECLINE()        \
    do {                 \
        declined = 1;    \
        goto done;       \
    } while (0)
#define CHECK(expr)                   \
    do {                              \
        rc = (expr);                  \
        if (rc < 0) {                 \
            goto done;                \
        }                             \
        if (rc == 0) {                \
            DECLINE();                \
        }                             \
    } while (0)

    /* ---- split into lines; ASCII, CRLF only, no folding, bounded length */
    p = head;
    first_end = NULL;
    for (;;) {
        const char *q = p;
        while (q < hend && *q != '\r' && *q != '\n') {
            if ((unsigned char)*q >= 0x80) {
                DECLINE();
            }
            q++;
        }
        if (q - p > max_line) {
            DECLINE();
        }
        if (q < hend && (*q != '\r' || q + 1 >= hend || q[1] != '\n')) {
            DECLINE(); /* bare CR or LF */
        }
        if (first_end == NULL) {
            first_end = q;
        }
        else {
            if (nlines >= MAX_LINES || nlines >= max_headers) {
                DECLINE();
            }
            if (q == p || *p == ' ' || *p == '\t') {
                DECLINE(); /* empty line or folding */
            }
            ls[nlines] = p;
            le[nlines] = q;
            nlines++;
        }
        if (q >= hend) {
            break;
        }
        p = q + 2;
    }

    /* ---- start line */
    p = head;
    if (first_end - p >= 12 && memcmp(p, "SIP/2.0 ", 8) == 0) {
        const char *c = p + 8;
        if (!(c[0] >= '1' && c[0] <= '6' && IS(c[1], C_DIGIT) && IS(c[2], C_DIGIT) &&
              c[3] == ' ')) {
            DECLINE();
        }
        is_response = 1;
        f[F_A] = PyLong_FromLong((c[0] - '0') * 100 + (c[1] - '0') * 10 + (c[2] - '0'));
        if (f[F_A] == NULL) {
            goto done;
        }
        f[F_B] = str_of(c + 4, first_end);
        if (f[F_B] == NULL) {
            goto done;
        }
    }
    else {
        const char *m = p, *me, *u, *ue;
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
        {
            const char *s = ue;
            ue = span(ue, first_end, C_RURI);
            if (ue == s) {
                DECLINE();
            }
        }
        if (first_end - ue != 8 || memcmp(ue, " SIP/2.0", 8) != 0) {
            DECLINE();
        }
        is_response = 0;
        f[F_A] = str_of(m, me);
        if (f[F_A] == NULL) {
            goto done;
        }
        f[F_B] = str_of(u, ue);
        if (f[F_B] == NULL) {
            goto done;
        }
    }
    f[F_IS_RESPONSE] = Py_NewRef(is_response ? Py_True : Py_False);

    /* ---- the index */
    f[F_LINES] = PyList_New(nlines);
    f[F_NAMES] = PyList_New(nlines);
    f[F_OFFS] = PyList_New(nlines);
    f[F_BLENS] = PyList_New(nlines);
    f[F_POS] = PyDict_New();
    if (!f[F_LINES] || !f[F_NAMES] || !f[F_OFFS] || !f[F_BLENS] || !f[F_POS]) {
        goto done;
    }
    for (i = 0; i < nlines; i++) {
        const char *colon = memchr(ls[i], ':', le[i] - ls[i]);
        PyObject *line, *written, *canon, *num;
        if (colon == NULL) {
            DECLINE();
        }
        vs[i] = colon + 1;
        canon = known_name(ls[i], colon); /* borrowed */
        if (canon == NULL) {
            written = str_of(ls[i], colon);
            if (written == NULL) {
                goto done;
            }
            canon = PyDict_GetItemWithError(cache, written); /* borrowed */
            Py_DECREF(written);
            if (canon == NULL) {
                if (PyErr_Occurred()) {
                    goto done;
                }
                DECLINE(); /* a spelling not seen before: canonical_name validates it */
            }
        }
        if (!PyUnicode_CheckExact(canon)) {
            DECLINE();
        }
        line = str_of(ls[i], le[i]);
        if (line == NULL) {
            goto done;
        }
        PyList_SET_ITEM(f[F_LINES], i, line);
        PyList_SET_ITEM(f[F_NAMES], i, Py_NewRef(canon));
        num = PyLong_FromSsize_t(ls[i] - head);
        if (num == NULL) {
            goto done;
        }
        PyList_SET_ITEM(f[F_OFFS], i, num);
        num = PyLong_FromSsize_t(le[i] - ls[i]);
        if (num == NULL) {
            goto done;
        }
        PyList_SET_ITEM(f[F_BLENS], i, num);
        num = PyLong_FromSsize_t(i);
        if (num == NULL) {
            goto done;
        }
        rc = PyDict_SetItem(f[F_POS], canon, num);
        Py_DECREF(num);
        if (rc < 0) {
            goto done;
        }
        switch (PyUnicode_GET_LENGTH(canon)) {
        case 2:
            if (line_is(canon, "to")) {
                if (idx_to >= 0) {
                    DECLINE();
                }
                idx_to = i;
            }
            break;
        case 3:
            if (line_is(canon, "via") && idx_via < 0) {
                idx_via = i;
            }
            break;
        case 4:
            if (line_is(canon, "from")) {
                if (idx_from >= 0) {
                    DECLINE();
                }
                idx_from = i;
            }
            else if (line_is(canon, "cseq")) {
                if (idx_cseq >= 0) {
                    DECLINE();
                }
                idx_cseq = i;
            }
            break;
        case 7:
            if (line_is(canon, "call-id")) {
                if (idx_call_id >= 0) {
                    DECLINE();
                }
                idx_call_id = i;
            }
            break;
        case 12:
            if (line_is(canon, "max-forwards")) {
                if (idx_mf >= 0) {
                    DECLINE();
                }
                idx_mf = i;
            }
            break;
        case 14:
            if (line_is(canon, "content-length")) {
                if (idx_cl >= 0) {
                    DECLINE();
                }
                idx_cl = i;
            }
            break;
        default:
            break;
        }
    }
    if (idx_to < 0 || idx_from < 0 || idx_call_id < 0 || idx_cseq < 0 || idx_via < 0) {
        DECLINE();
    }

    /* ---- the values every message is checked for */
    CHECK(parse_call_id(vs[idx_call_id], le[idx_call_id], &f[F_CALL_ID]));
    CHECK(parse_cseq(vs[idx_cseq], le[idx_cseq], &f[F_CSEQ_NUMBER], &f[F_CSEQ_METHOD]));
    if (!is_response) {
        rc = PyUnicode_Compare(f[F_CSEQ_METHOD], f[F_A]);
        if (rc == -1 && PyErr_Occurred()) {
            goto done;
        }
        if (rc != 0) {
            DECLINE();
        }
    }
    CHECK(parse_via(vs[idx_via], le[idx_via], &f[F_VIA_TRANSPORT], &f[F_VIA_HOST],
                    &f[F_VIA_PORT], &f[F_VIA_PARAMS]));
    CHECK(parse_name_addr(vs[idx_from], le[idx_from], &f[F_FROM_DISPLAY], &f[F_FROM_URI],
                          &f[F_FROM_PARAMS]));
    CHECK(parse_name_addr(vs[idx_to], le[idx_to], &f[F_TO_DISPLAY], &f[F_TO_URI],
                          &f[F_TO_PARAMS]));
    if (idx_mf >= 0) {
        CHECK(parse_digits(vs[idx_mf], le[idx_mf], 10, &number));
        if (number > 255) {
            DECLINE();
        }
        f[F_MAX_FORWARDS] = PyLong_FromLongLong(number);
    }
    else {
        f[F_MAX_FORWARDS] = Py_NewRef(Py_None);
    }
    if (f[F_MAX_FORWARDS] == NULL) {
        goto done;
    }
    if (idx_cl >= 0) {
        CHECK(parse_digits(vs[idx_cl], le[idx_cl], 10, &number));
        f[F_CONTENT_LENGTH] = PyLong_FromLongLong(number);
    }
    else {
        f[F_CONTENT_LENGTH] = Py_NewRef(Py_None);
    }
    if (f[F_CONTENT_LENGTH] == NULL) {
        goto done;
    }

    result = PyTuple_New(F_COUNT);
    if (result != NULL) {
        for (i = 0; i < F_COUNT; i++) {
            PyTuple_SET_ITEM(result, i, f[i]); /* steals */
            f[i] = NULL;
        }
    }

done:
    PyBuffer_Release(&view);
    for (i = 0; i < F_COUNT; i++) {
        Py_XDECREF(f[i]);
    }
    if (declined && !PyErr_Occurred()) {
        Py_XDECREF(result);
        Py_RETURN_NONE;
    }
    return result;
#undef DECLINE
#undef CHECK
}

static PyObject *
known_names(PyObject *module, PyObject *unused)
{
    PyObject *out = PyDict_New();
    Py_ssize_t k;
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

static PyMethodDef methods[] = {
    {"known_names", known_names, METH_NOARGS,
     "known_names() -> dict: the built-in header name table (written -> canonical)"},
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(data, base, head_end, max_line, max_headers, name_cache) -> tuple | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "sipcore._fastparse",
    "Optional C accelerator for sipcore.message (see _fastparse.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastparse(void)
{
    PyObject *m;
    Py_ssize_t k;
    init_classes();
    for (k = 0; k < K_COUNT; k++) {
        keys[k] = PyUnicode_InternFromString(key_text[k]);
        if (keys[k] == NULL) {
            return NULL;
        }
    }
    for (k = 0; k < N_NAMES; k++) {
        name_canon[k] = PyUnicode_InternFromString(name_table[k][1]);
        if (name_canon[k] == NULL) {
            return NULL;
        }
        name_len[k] = (Py_ssize_t)strlen(name_table[k][0]);
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
