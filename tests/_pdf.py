"""Hand-made PDFs for the bad-document tests: an encrypted one (no password opens it) and one with no pages."""

from __future__ import annotations

CATALOG = b"<< /Type /Catalog /Pages 2 0 R >>"


def write_pdf(path, objects, trailer=b""):
    """A minimal PDF from raw object bodies (1 0 obj is the catalog), with a correct xref table."""
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (i, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R %s>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, trailer, xref)
    path.write_bytes(bytes(out))
    return path



def encrypted_pdf(path):
    """One page, standard security handler with made-up /O and /U entries: the empty user password fails."""
    return write_pdf(path, [
        CATALOG, b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>", b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] >>",
        b"<< /Filter /Standard /V 1 /R 2 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> /P -44 >>"],
        b"/Encrypt 4 0 R /ID [<" + b"00" * 16 + b"> <" + b"00" * 16 + b">] ")
