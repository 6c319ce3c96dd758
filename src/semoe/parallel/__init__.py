"""semoe.parallel"""
