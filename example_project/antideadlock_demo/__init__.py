"""Demo project for scrapy-antideadlock: a normal Scrapy project using the pack via ADDONS."""
