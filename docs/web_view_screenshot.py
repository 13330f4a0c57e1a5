"""Make docs/web-view.png: `loramux serve` on a library, one mixed request, then the web view in
headless Chromium (Debian's chromium + chromium-driver) with a prompt routed by Arrow.

    python docs/web_view_screenshot.py --library $LORAMUX_HOME/library --prompt "..."
"""

import argparse
import subprocess
import sys
from pathlib import Path

import openai
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from loramux.bench.load import wait_ready
from loramux.server.background import free_port

ap = argparse.ArgumentParser()
ap.add_argument("--library", required=True)
ap.add_argument("--prompt", default="Which language is this sentence written in? 'Der Hund schläft im Garten.'")
ap.add_argument("--router", default="arrow")
ap.add_argument("--output", default=str(Path(__file__).parent / "web-view.png"))
args = ap.parse_args()

port = free_port()
proc = subprocess.Popen([str(Path(sys.executable).parent / "loramux"), "serve", "-l", args.library, "--port", str(port)])
try:
    root = f"http://127.0.0.1:{port}"
    wait_ready(root)
    client = openai.OpenAI(base_url=f"{root}/v1", api_key="none")
    names = [m.id for m in client.models.list().data if m.id not in ("base", "auto", "arrow", "dlp", "mole")][:3]
    client.chat.completions.create(model="base", messages=[{"role": "user", "content": args.prompt}], max_tokens=8,
                                   temperature=0, extra_body={"loramux": {"mix": dict(zip(names, (0.5, 0.3, 0.2)))}})
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(root + "/")
        wait = WebDriverWait(driver, 300)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#recent tr.row"))
        driver.find_element(By.ID, "prompt").send_keys(args.prompt)
        Select(driver.find_element(By.ID, "router")).select_by_visible_text(args.router)
        driver.find_element(By.ID, "go").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#routing .bar")))
        driver.save_screenshot(args.output)
        print("wrote", args.output)
    finally:
        driver.quit()
finally:
    proc.terminate()
    proc.wait(timeout=60)
