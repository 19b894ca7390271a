"""The style sheet of ``report.html``, inlined in its ``<style>`` element (no external file).

>>> "url(" in CSS or "@import" in CSS  # nothing fetched
False
"""

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1b1b;
background:#fff;max-width:1140px;margin:0 auto;padding:16px 24px 48px}
header h1{margin-bottom:0}header p{color:#555;margin-top:4px}
h2{border-bottom:2px solid #d8d8e0;padding-bottom:4px;margin-top:36px}h3{margin-bottom:6px}
table{border-collapse:collapse;margin:8px 0 12px;font-size:13px}
th,td{border:1px solid #d4d4dc;padding:4px 8px;text-align:left;vertical-align:top}
thead th{background:#eef0f6}tbody tr:nth-child(even){background:#f8f9fc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.text{display:inline-block;max-width:380px;overflow-wrap:anywhere;white-space:pre-wrap}
code{font-size:12px;overflow-wrap:anywhere}
.na{color:#8a5a00;font-style:italic}.warn{color:#9b1c1c;font-weight:600}.guide{color:#555;max-width:900px}
#headline table{font-size:14px}#headline td:nth-child(2){font-weight:600;white-space:nowrap}
figure{margin:12px 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:12px}details{margin:8px 0}summary{cursor:pointer;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:4px 28px}.split{max-width:360px}
footer{margin-top:40px;color:#777;font-size:12px}
"""
